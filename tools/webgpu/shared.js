// The checks the browser page (check.js) and Dawn for Node (node-check.mjs) share: compiling
// a variant, building its pipeline, which variants the device's limits admit, and the
// pipeline sample of a default run. A variant is an entry of the manifest that
// `wattn shaders --emit` writes.

/** The WGSL line `lineNum` (1-based) of `code`, trimmed, for error messages. */
function sourceLine(code, lineNum) {
  const line = code.split('\n')[lineNum - 1];
  return line === undefined ? '' : ` at \`${line.trim()}\``;
}

/**
 * Compiles `code` with createShaderModule and reads its compilation info.
 * Returns { module, error }: error is null, or every error message with its line.
 */
export async function compile(device, variant, code) {
  // Popped before awaiting anything: error scopes are one stack per device, shared by the
  // compilations in flight.
  device.pushErrorScope('validation');
  const module = device.createShaderModule({ label: variant.label, code });
  const popped = device.popErrorScope();
  const info = await module.getCompilationInfo();
  const scoped = await popped;
  const errors = info.messages
    .filter((m) => m.type === 'error')
    .map((m) => `${m.lineNum}:${m.linePos} ${m.message}${sourceLine(code, m.lineNum)}`);
  if (errors.length === 0 && scoped) errors.push(scoped.message);
  return { module, error: errors.length ? errors.join('; ') : null };
}

/** Builds the variant's compute pipeline (layout 'auto'). Returns { pipeline, error }. */
export async function buildPipeline(device, variant, module) {
  try {
    const pipeline = await device.createComputePipelineAsync({
      label: variant.label,
      layout: 'auto',
      compute: { module, entryPoint: variant.entry_point },
    });
    return { pipeline, error: null };
  } catch (e) {
    return { pipeline: null, error: String(e.message || e).trim() };
  }
}

/** Why the device's limits do not admit the variant's pipeline, or null when they do. */
export function notAdmitted(limits, variant) {
  const [x, y, z] = variant.workgroup_size;
  const checks = [
    [variant.workgroup_memory_bytes, 'maxComputeWorkgroupStorageSize', 'bytes of workgroup memory'],
    [x * y * z, 'maxComputeInvocationsPerWorkgroup', 'invocations per workgroup'],
    [x, 'maxComputeWorkgroupSizeX', 'workgroup size x'],
  ];
  for (const [needed, limit, what] of checks) {
    if (needed > limits[limit]) return `needs ${needed} ${what}, the device allows ${limits[limit]} (${limit})`;
  }
  return null;
}

// Constants that only size a head dim: the sample keeps their smallest and largest values.
const HEAD_DIM_CONSTANTS = new Set(['DQK_PAD', 'DV_PAD', 'D_PAD']);

/** A flash variant's tiles, as `wattn bench --config` writes them: BQ,BK,R,T,S. */
export const tilesOf = (c) =>
  `${c.BLOCK_Q},${c.BLOCK_K},${4 * c.ROW_GROUPS},${c.SPLIT},${c.SHUFFLE_KV ? 2 : c.STAGE_KV ? 1 : 0}`;

/**
 * The pipelines a default run builds, from the admitted `variants` in manifest order. Per
 * (kernel, entry point, dtype): the first variant showing each value of each constant
 * (the flash tile preset, see tilesOf, counts as one constant), where a
 * head-dim constant (DQK_PAD, DV_PAD, D_PAD) counts only its smallest and largest value;
 * and the variant with the most workgroup memory. `--all` builds every admitted variant.
 */
export function pipelineSample(variants) {
  const groups = new Map();
  for (const v of variants) {
    const group = `${v.kernel}:${v.entry_point}:${v.dtype}`;
    if (!groups.has(group)) groups.set(group, []);
    groups.get(group).push(v);
  }
  const sample = new Set();
  for (const members of groups.values()) {
    const extremes = {};
    for (const name of HEAD_DIM_CONSTANTS) {
      const values = members.map((v) => v.constants[name]).filter((x) => x !== undefined);
      if (values.length) extremes[name] = [Math.min(...values), Math.max(...values)];
    }
    const seen = new Set();
    for (const v of members) {
      const c = v.constants;
      const traits = Object.entries(c)
        .filter(([name, value]) => !HEAD_DIM_CONSTANTS.has(name) || extremes[name].includes(value))
        .map(([name, value]) => `${name}=${value}`);
      if ('BLOCK_Q' in c) traits.push(`preset=${tilesOf(c)}`);
      if (traits.length === 0) traits.push('only');
      if (traits.some((t) => !seen.has(t))) {
        traits.forEach((t) => seen.add(t));
        sample.add(v);
      }
    }
    sample.add(members.reduce((a, b) => (b.workgroup_memory_bytes > a.workgroup_memory_bytes ? b : a)));
  }
  return variants.filter((v) => sample.has(v));
}
