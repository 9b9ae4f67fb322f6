// The f16 half of the WebGPU check, run by tools/webgpu-check.sh: Dawn for Node (npm
// package `webgpu`) on its null backend, whose adapter has shader-f16 (Chromium's
// SwiftShader has not). Every f16 variant is compiled (createShaderModule +
// getCompilationInfo), and the pipeline of every one the null adapter's limits admit (cheap
// there: the null backend compiles to nothing and executes nothing, so there are no runs).
//
// Usage: node node-check.mjs SHADERS_DIR RESULTS_JSON

import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { create, globals } from 'webgpu';
import { compile, buildPipeline, notAdmitted } from './shared.js';

Object.assign(globalThis, globals);

const LIMITS = ['maxComputeWorkgroupStorageSize', 'maxComputeInvocationsPerWorkgroup', 'maxComputeWorkgroupSizeX'];

// Variants per device: Dawn for Node crashes when more than about 1,150 shader modules are
// alive at once, so each chunk gets its own adapter and device, destroyed after it.
const CHUNK = 300;

async function openDevice(gpu) {
  const adapter = await gpu.requestAdapter();
  if (!adapter) throw new Error("Dawn's null backend gave no adapter");
  if (!adapter.features.has('shader-f16')) throw new Error("Dawn's null adapter has no shader-f16");
  const requiredLimits = Object.fromEntries(LIMITS.map((name) => [name, adapter.limits[name]]));
  const requiredFeatures = ['shader-f16', 'subgroups'].filter((f) => adapter.features.has(f));
  const device = await adapter.requestDevice({ requiredFeatures, requiredLimits });
  return { device, requiredLimits, requiredFeatures };
}

async function check(dir, results) {
  const manifest = JSON.parse(await readFile(join(dir, 'manifest.json'), 'utf8'));
  const gpu = create(['backend=null']);
  const first = await openDevice(gpu);
  results.adapter = { vendor: 'dawn', architecture: 'null backend' };
  results.limits = first.requiredLimits;
  results.features = first.requiredFeatures;
  const hasSubgroups = first.device.features.has('subgroups');
  first.device.destroy();

  const f16 = [];
  for (const v of manifest.variants.filter((v) => v.dtype === 'f16')) {
    if (v.subgroups && !hasSubgroups) {
      results.skipped.push({ stage: 'validate', kernel: v.kernel, name: v.label, why: 'the adapter has no subgroups' });
    } else {
      f16.push(v);
    }
  }
  for (let at = 0; at < f16.length; at += CHUNK) {
    const { device } = await openDevice(gpu);
    const chunk = f16.slice(at, at + CHUNK);
    const modules = new Map();
    for (const v of chunk) {
      const { module, error } = await compile(device, v, await readFile(join(dir, v.file), 'utf8'));
      results.checks.push({ stage: 'validate', kernel: v.kernel, name: v.label, ok: !error, error: error || undefined });
      if (!error) modules.set(v.file, module);
    }
    for (const v of chunk) {
      const why = notAdmitted(device.limits, v);
      if (why) {
        results.skipped.push({ stage: 'pipeline', kernel: v.kernel, name: v.label, why });
      } else if (!modules.has(v.file)) {
        results.skipped.push({ stage: 'pipeline', kernel: v.kernel, name: v.label, why: 'did not compile' });
      } else {
        const { error } = await buildPipeline(device, v, modules.get(v.file));
        results.checks.push({ stage: 'pipeline', kernel: v.kernel, name: v.label, ok: !error, error: error || undefined });
      }
    }
    device.destroy();
  }
}

const [dir, resultsPath, ...extra] = process.argv.slice(2);
if (!dir || !resultsPath || extra.length) {
  console.error('usage: node node-check.mjs SHADERS_DIR RESULTS_JSON');
  process.exit(2);
}
const results = { runner: 'dawn-node', checks: [], skipped: [], fatal: null };
const started = performance.now();
try {
  await check(dir, results);
} catch (e) {
  results.fatal = String((e && e.stack) || e);
}
results.seconds = (performance.now() - started) / 1000;
await writeFile(resultsPath, JSON.stringify(results));
process.exit(0);
