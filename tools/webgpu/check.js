// The page of tools/webgpu-check.sh: WebGPU conformance of every shader variant in this
// browser (Chromium: Dawn and Tint). Three stages, each recorded per variant or case:
//   validate  createShaderModule + getCompilationInfo of every variant the device's
//             features allow (f16 ones need shader-f16; without it node-check.mjs does them)
//   pipeline  createComputePipelineAsync of the sample (shared.js) or, with ?all, of every
//             variant the device's limits admit
//   run       the attention kernels on small problems against an f64 reference (cases.js)
// Progress goes to POST /log, the results to POST /results (serve.py).

import { compile, buildPipeline, notAdmitted, pipelineSample } from './shared.js';
import { caseList } from './cases.js';

// Limits raised to the adapter's: the variants for 32 KiB devices need more than the default 16 KiB.
const LIMITS = [
  'maxComputeWorkgroupStorageSize',
  'maxComputeInvocationsPerWorkgroup',
  'maxComputeWorkgroupSizeX',
  'maxStorageBufferBindingSize',
  'maxStorageBuffersPerShaderStage',
  'maxBufferSize',
];
// Work in flight at once: Dawn compiles asynchronous pipelines on worker threads, and
// fetching the next modules overlaps compiling the last ones.
const PIPELINES_IN_FLIGHT = 4;
const MODULES_IN_FLIGHT = 8;

async function log(line) {
  document.getElementById('log').textContent += line + '\n';
  await fetch('/log', { method: 'POST', body: line });
}

async function fetchOk(path) {
  const response = await fetch(path);
  if (!response.ok) throw new Error(`GET ${path}: ${response.status} ${response.statusText}`);
  return response;
}

/** Runs `task` over `items` with at most `width` at once, in order of start. */
async function inParallel(items, width, task) {
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const item = items[next++];
      await task(item);
    }
  };
  await Promise.all(Array.from({ length: Math.min(width, items.length) }, worker));
}

async function check(results) {
  const all = new URLSearchParams(location.search).has('all');
  results.all = all;
  const manifest = await (await fetchOk('/shaders/manifest.json')).json();
  if (!navigator.gpu) {
    throw new Error('navigator.gpu is missing: this browser has no WebGPU (flag --enable-unsafe-webgpu?)');
  }
  const adapter = await navigator.gpu.requestAdapter();
  if (!adapter) throw new Error('navigator.gpu.requestAdapter() found no adapter');
  const info = adapter.info || {};
  results.adapter = { vendor: info.vendor, architecture: info.architecture, description: info.description };
  const requiredLimits = Object.fromEntries(LIMITS.map((name) => [name, adapter.limits[name]]));
  const requiredFeatures = ['shader-f16', 'subgroups'].filter((f) => adapter.features.has(f));
  const device = await adapter.requestDevice({ requiredLimits, requiredFeatures });
  device.lost.then((lost) => log(`device lost: ${lost.reason} ${lost.message}`));
  results.limits = requiredLimits;
  results.features = requiredFeatures;
  await log(`adapter ${info.vendor} ${info.architecture} ${info.description || ''}, features [${requiredFeatures}]`);

  const record = (stage, kernel, name, error, extra = {}) =>
    results.checks.push({ stage, kernel, name, ok: !error, error: error || undefined, ...extra });
  const skip = (stage, kernel, name, why) => results.skipped.push({ stage, kernel, name, why });

  // Validate.
  const started = performance.now();
  const modules = new Map();
  await inParallel(manifest.variants, MODULES_IN_FLIGHT, async (v) => {
    if (v.dtype === 'f16' && !device.features.has('shader-f16')) {
      skip('validate', v.kernel, v.label, 'the adapter has no shader-f16 (Dawn for Node validates f16)');
      return;
    }
    if (v.subgroups && !device.features.has('subgroups')) {
      skip('validate', v.kernel, v.label, 'the adapter has no subgroups');
      return;
    }
    const code = await (await fetchOk(`/shaders/${v.file}`)).text();
    const { module, error } = await compile(device, v, code);
    record('validate', v.kernel, v.label, error);
    if (!error) modules.set(v.file, module);
  });
  await log(`validated ${modules.size} of ${manifest.variants.length} variants in ${seconds(started)} s`);

  // Pipelines: the sample (or every admitted variant) and those the runs use, each built once.
  const admitted = [];
  for (const v of manifest.variants) {
    const why = notAdmitted(device.limits, v);
    if (why) skip('pipeline', v.kernel, v.label, why);
    else if (v.dtype === 'f16' && !device.features.has('shader-f16')) skip('pipeline', v.kernel, v.label, 'no f16');
    else if (v.subgroups && !device.features.has('subgroups')) skip('pipeline', v.kernel, v.label, 'no subgroups');
    else admitted.push(v);
  }
  const runs = caseList(device, admitted);
  const wanted = new Set([...(all ? admitted : pipelineSample(admitted)), ...runs.flatMap(([, , uses]) => uses)]);
  const buildable = admitted.filter((v) => wanted.has(v) && modules.has(v.file));
  for (const v of admitted.filter((v) => wanted.has(v) && !modules.has(v.file))) {
    skip('pipeline', v.kernel, v.label, 'did not compile');
  }
  const which = all ? 'every one' : 'a sample';
  await log(`building ${buildable.length} pipelines: ${which} of the ${admitted.length} admitted, and the runs'`);
  const pipelines = new Map();
  const t1 = performance.now();
  await inParallel(buildable, PIPELINES_IN_FLIGHT, async (v) => {
    const t0 = performance.now();
    const built = await buildPipeline(device, v, modules.get(v.file));
    pipelines.set(v.file, built);
    record('pipeline', v.kernel, v.label, built.error, { ms: Math.round(performance.now() - t0) });
    if (pipelines.size % 10 === 0) await log(`  ${pipelines.size}/${buildable.length} pipelines, ${seconds(t1)} s`);
  });
  await log(`built ${buildable.length} pipelines in ${seconds(t1)} s`);

  // Runs.
  const t2 = performance.now();
  for (const [kernel, name, uses, run] of runs) {
    const missing = uses.find((v) => !pipelines.get(v.file)?.pipeline);
    const why = pipelines.has(missing?.file) ? 'it failed' : 'it did not compile';
    let error = missing && `no pipeline for ${missing.label} (${why})`;
    if (!error) {
      try {
        error = await run(uses.map((v) => pipelines.get(v.file).pipeline));
      } catch (e) {
        error = `threw: ${e.message || e}`;
      }
    }
    record('run', kernel, name, error);
  }
  await log(`ran ${runs.length} cases in ${seconds(t2)} s`);
}

const seconds = (since) => ((performance.now() - since) / 1000).toFixed(1);

/** "Chromium 156.0.8078.114": the user agent string gives only the major version. */
async function browserVersion() {
  const values = await navigator.userAgentData?.getHighEntropyValues(['fullVersionList']).catch(() => null);
  const brand = values?.fullVersionList?.find((b) => /Chrom/.test(b.brand));
  return brand ? `${brand.brand} ${brand.version}` : navigator.userAgent;
}

async function main() {
  const results = { runner: 'chromium', browser: await browserVersion(), checks: [], skipped: [], fatal: null };
  const t0 = performance.now();
  try {
    await check(results);
  } catch (e) {
    results.fatal = String((e && e.stack) || e);
    await log(`fatal: ${results.fatal}`);
  }
  results.seconds = (performance.now() - t0) / 1000;
  await fetch('/results', { method: 'POST', body: JSON.stringify(results) });
}

main();
