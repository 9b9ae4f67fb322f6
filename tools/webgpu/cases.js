// The attention kernels run on small problems and judged against reference.js: the flash
// forward (dense, causal with nQ > nK, a window with sinks and softcap, GQA with
// Dqk != Dv, a block mask) on every tile preset, its varlen variants (packed sequences,
// judged sequence by sequence), the flash backward (dQ, dK, dV: causal with nQ > nK, a
// window with sinks and odd head dims, GQA with softcap, MQA with wide heads), split-KV
// decode + combine, and combine alone. Uniform structs are filled from the manifest's
// layouts by member name; grids and buffers follow the Rust host (src/attention/flash.rs,
// src/attention/varlen.rs, src/attention/backward.rs, src/kv/decode.rs, src/kv/combine.rs,
// src/mask/gpu.rs).

import { attention, judge, judgeVarlen, judgeBackward, merge, judgeMerge } from './reference.js';
import { tilesOf } from './shared.js';

// flash_fwd.wgsl's pass flags: one pass walks every key (the Rust host splits the keys into
// several passes only where the adapter caps loop iterations, as llvmpipe does).
const FIRST_PASS = 1;
const LAST_PASS = 2;
// decode.wgsl: a slot that holds no token.
const EMPTY_SLOT = 0xffffffff;
// Block-mask runs: FULL_RUN marks a run of full tiles (src/mask/mod.rs KvRun::FULL).
const FULL_RUN = 0xffffffff;

/** A deterministic generator of floats in [-1, 1), rounded to f32 (mulberry32). */
function random(seed) {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return Math.fround(((t ^ (t >>> 14)) >>> 0) / 2 ** 31 - 1);
  };
}

function randomArray(n, rng, spread = 1) {
  return Float32Array.from({ length: n }, () => Math.fround(spread * rng()));
}

/**
 * The bytes of a struct laid out as `layout` (from the manifest), each member taken from
 * `values` by name; members whose name starts with `_` are padding. A runtime-sized array
 * member (the last one) gets `tail` (u32 words). Errors name the member the case lacks.
 */
function packStruct(layout, values, tail, what) {
  const runtime = layout.members.find((m) => m.type.startsWith('array<'));
  const size = runtime ? runtime.offset + 4 * tail.length : layout.size;
  const bytes = new ArrayBuffer(Math.max(16, Math.ceil(size / 16) * 16));
  const view = new DataView(bytes);
  for (const m of layout.members) {
    if (m === runtime) {
      new Uint32Array(bytes, m.offset, tail.length).set(tail);
      continue;
    }
    const x = values[m.name] ?? (m.name.startsWith('_') ? 0 : undefined);
    if (x === undefined) throw new Error(`${what}: no value for member ${m.name}: ${m.type}`);
    if (m.type === 'u32') view.setUint32(m.offset, x, true);
    else if (m.type === 'i32') view.setInt32(m.offset, x, true);
    else if (m.type === 'f32') view.setFloat32(m.offset, x, true);
    else throw new Error(`${what}: member ${m.name} has type ${m.type}, which this page cannot fill`);
  }
  const unknown = Object.keys(values).filter((name) => !layout.members.some((m) => m.name === name));
  if (unknown.length) throw new Error(`${what}: the shader has no member ${unknown.join(', ')}`);
  return bytes;
}

/** The layout of the struct bound as `name` in `variant`. */
function layoutOf(variant, name) {
  const b = variant.bindings.find((b) => b.name === name);
  if (!b || !b.layout) throw new Error(`${variant.label}: no struct binding ${name}`);
  return b.layout;
}

const STORAGE = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;

/**
 * A buffer holding `data`, its size rounded up to whole vec4 words as the Rust host's tensors
 * are: the kernels read rows of a head dim that is not a multiple of 4 by whole words, so the
 * last row's last word would otherwise lie partly past the end (robust access then reads
 * something else there).
 */
function buffer(device, data, usage = STORAGE) {
  const bytes = data instanceof ArrayBuffer ? data : data.buffer;
  const b = device.createBuffer({ size: Math.max(16, Math.ceil(bytes.byteLength / 16) * 16), usage });
  device.queue.writeBuffer(b, 0, bytes);
  return b;
}

/** The uniform buffer of `variant`'s `params` struct, filled by member name. */
function uniformBuffer(device, variant, values) {
  const bytes = packStruct(layoutOf(variant, 'params'), values, null, `${variant.kernel} params`);
  return buffer(device, bytes, GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST);
}

/** A buffer of `n` f32 NaNs: an element the kernel does not write reads back as NaN. */
function sentinel(device, n) {
  return buffer(device, new Float32Array(n).fill(NaN));
}

/** The bind group of group 0 with each of the variant's bindings taken from `buffers` by name. */
function bindByName(device, variant, pipeline, buffers) {
  const entries = variant.bindings.map((b) => {
    if (!buffers[b.name]) throw new Error(`${variant.label}: no buffer for binding ${b.binding} (${b.name})`);
    return { binding: b.binding, resource: { buffer: buffers[b.name] } };
  });
  device.pushErrorScope('validation');
  const group = device.createBindGroup({ layout: pipeline.getBindGroupLayout(0), entries });
  return device.popErrorScope().then((error) => {
    if (error) throw new Error(`bind group of ${variant.label}: ${error.message}`);
    return group;
  });
}

/** Dispatches each [variant, pipeline, buffers, grid] in one pass and reads back `outputs`. */
async function dispatch(device, steps, outputs) {
  const groups = await Promise.all(
    steps.map(([variant, pipeline, buffers]) => bindByName(device, variant, pipeline, buffers)),
  );
  const encoder = device.createCommandEncoder();
  const pass = encoder.beginComputePass();
  for (const [i, [, pipeline, , grid]] of steps.entries()) {
    pass.setPipeline(pipeline);
    pass.setBindGroup(0, groups[i]);
    pass.dispatchWorkgroups(...grid);
  }
  pass.end();
  const reads = outputs.map((b) => {
    const read = device.createBuffer({ size: b.size, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
    encoder.copyBufferToBuffer(b, 0, read, 0, b.size);
    return read;
  });
  device.pushErrorScope('validation');
  device.queue.submit([encoder.finish()]);
  const error = await device.popErrorScope();
  if (error) throw new Error(`dispatch: ${error.message}`);
  return Promise.all(
    reads.map(async (read) => {
      await read.mapAsync(GPUMapMode.READ);
      const data = new Float32Array(read.getMappedRange().slice(0));
      read.unmap();
      return data;
    }),
  );
}

/**
 * The block-mask buffer of flash_fwd.wgsl for `mask(b, h, i, j)` on tiles of bq x bk:
 * per mask row (batch, head, query block) the runs of consecutive key tiles of one class,
 * full (every element visible) or partial (with one bit per element, bit r * bk + j, the
 * partial tiles of a run stored consecutively); empty tiles are in no run.
 */
function blockMaskWords(p, maskBatch, maskHeads, bq, bk) {
  const qBlocks = Math.ceil(p.nQ / bq);
  const kBlocks = Math.ceil(p.nK / bk);
  const maskWords = Math.ceil((bq * bk) / 32);
  const rowStarts = [0];
  const runs = []; // [first, end, FULL_RUN or the index of the first tile's element mask]
  const bits = [];
  for (let b = 0; b < maskBatch; b++) {
    for (let h = 0; h < maskHeads; h++) {
      for (let qb = 0; qb < qBlocks; qb++) {
        const rowStart = runs.length;
        for (let kb = 0; kb < kBlocks; kb++) {
          const tile = new Array(maskWords).fill(0);
          let seen = 0;
          let elements = 0;
          for (let r = 0; r < bq && qb * bq + r < p.nQ; r++) {
            for (let j = 0; j < bk && kb * bk + j < p.nK; j++) {
              elements += 1;
              if (p.mask(b, h, qb * bq + r, kb * bk + j)) {
                seen += 1;
                const bit = r * bk + j;
                tile[bit >>> 5] |= 1 << (bit & 31);
              }
            }
          }
          if (seen === 0) continue;
          const full = seen === elements;
          const last = runs.length > rowStart ? runs[runs.length - 1] : null;
          const continuesRun = last && last[1] === kb && (last[2] === FULL_RUN) === full;
          if (continuesRun) last[1] = kb + 1;
          else runs.push([kb, kb + 1, full ? FULL_RUN : bits.length / maskWords]);
          if (!full) bits.push(...tile.map((w) => w >>> 0));
        }
        rowStarts.push(runs.length);
      }
    }
  }
  const runsAt = rowStarts.length;
  return {
    header: {
      batch: maskBatch,
      heads: maskHeads,
      q_blocks: qBlocks,
      runs_at: runsAt,
      bits_at: runsAt + 3 * runs.length,
    },
    words: Uint32Array.from([...rowStarts, ...runs.flat(), ...bits]),
  };
}

/** The `Params` (shared/attention.wgsl) of problem `p` in one pass over its keys. */
function attentionParams(p) {
  return {
    batch: p.batch,
    q_heads: p.qHeads,
    kv_heads: p.kvHeads,
    n_q: p.nQ,
    n_k: p.nK,
    d_qk: p.dQk,
    d_v: p.dV,
    sinks: p.sinks,
    window_left: p.window[0],
    window_right: p.window[1],
    scale: p.scale,
    softcap: p.softcap,
    key_begin: 0,
    key_end: p.packed ? p.packed.maxK : p.nK,
    pass_flags: FIRST_PASS | LAST_PASS,
  };
}

/**
 * Runs the flash variant on problem `p`; returns { out, lse }. A varlen problem (see
 * varlenProblem) runs packed: `p.nQ` and `p.nK` are the packed lengths, `p.packed` the rest.
 */
async function runFlash(device, variant, pipeline, p) {
  const c = variant.constants;
  const params = attentionParams(p);
  let blockMask = new Uint32Array(8); // the dense variant never reads it, but its layout has it
  if (c.BLOCK_SPARSE) {
    const grid = p.packed ? p.packed.maskGrid : p;
    const { header, words } = blockMaskWords(grid, p.maskBatch, p.maskHeads, c.BLOCK_Q, c.BLOCK_K);
    blockMask = packStruct(layoutOf(variant, 'block_mask'), header, words, 'block_mask');
  }
  const queryBlocks = p.packed ? varlenQueryBlocks(p.packed, c.BLOCK_Q) : null;
  const rows = p.batch * p.qHeads * p.nQ;
  const out = sentinel(device, rows * p.dV);
  const lse = sentinel(device, rows);
  const buffers = {
    params: uniformBuffer(device, variant, params),
    q: buffer(device, p.q),
    k: buffer(device, p.k),
    v: buffer(device, p.v),
    out,
    lse,
    state: buffer(device, new Float32Array(4)), // one pass: never touched
    block_mask: buffer(device, blockMask),
    query_blocks: buffer(device, queryBlocks ?? new Uint32Array(8)), // varlen only: dense variants never read it
  };
  const grid = queryBlocks
    ? varlenGrid(device, queryBlocks.length / QUERY_BLOCK_WORDS, p.qHeads)
    : [Math.ceil(p.nQ / c.BLOCK_Q), p.qHeads, p.batch];
  const [o, l] = await dispatch(device, [[variant, pipeline, buffers, grid]], [out, lse]);
  return { out: o.subarray(0, rows * p.dV), lse: l.subarray(0, rows) };
}

/** The combine grid of src/kv/combine.rs: one thread per element, wrapped into y. */
function combineGrid(device, combine, rows, dim) {
  const workgroups = Math.ceil((rows * dim) / combine.constants.WORKGROUP);
  const x = Math.min(Math.max(workgroups, 1), device.limits.maxComputeWorkgroupsPerDimension);
  return [x, Math.ceil(workgroups / x), 1];
}

/** The combine step [variant, pipeline, buffers, grid] merging `m.splits` partials of `m.rows` x `m.dim`. */
function combineStep(device, combine, pipeline, m, partialOut, partialLse, out, lse) {
  const grid = combineGrid(device, combine, m.rows, m.dim);
  const params = { rows: m.rows, dim: m.dim, splits: m.splits, groups_x: grid[0] };
  const uniform = uniformBuffer(device, combine, params);
  return [combine, pipeline, { params: uniform, partial_out: partialOut, partial_lse: partialLse, out, lse }, grid];
}

/**
 * Split-KV decode then combine on a cache problem `p` (see decodeProblem): the grid of
 * src/kv/decode.rs, (splits, row blocks, batch * KV heads). With `paged` (see pagedLayout),
 * the PAGED variant reads the same tokens from a page pool through block tables.
 * Returns { out, lse }.
 */
async function runDecode(device, [decode, decodePipeline], [combine, combinePipeline], p, paged = null) {
  const group = p.qHeads / p.kvHeads;
  const rows = group * p.nQ;
  const splits = Math.ceil(p.len / p.keysPerSplit);
  const queryRows = p.batch * p.qHeads * p.nQ;
  const params = {
    batch: p.batch,
    q_heads: p.qHeads,
    kv_heads: p.kvHeads,
    n_q: p.nQ,
    head_dim: p.dim,
    capacity: p.capacity,
    len: p.len,
    seen: p.seen,
    keys_per_split: p.keysPerSplit,
    rope: 0,
    rope_sinks: 0,
    rope_shift: 0,
    scale: p.scale,
    // The paged variants' members, unread by the dense ones: every token retained.
    page_shift: paged ? paged.pageShift : 0,
    sink_pages: 0,
    sinks: 0,
    window: 0xffffffff,
    scales_at: 0,
    k_scales_at: 0,
  };
  const partialOut = sentinel(device, splits * queryRows * p.dim);
  const partialLse = sentinel(device, splits * queryRows);
  const out = sentinel(device, queryRows * p.dim);
  const lse = sentinel(device, queryRows);
  const decodeBuffers = {
    params: uniformBuffer(device, decode, params),
    q: buffer(device, p.q),
    k: buffer(device, paged ? paged.k : p.cacheK),
    v: buffer(device, paged ? paged.v : p.cacheV),
    pos: buffer(device, paged ? paged.tables : p.positions),
    rope_or_positions: buffer(device, new Uint32Array(4)), // RoPE and heavy hitters off
    partial_out: partialOut,
    partial_lse: partialLse,
    logits: buffer(device, new Float32Array(4)), // LOGITS off
    // PAGED and INT8 off.
    seqs: buffer(device, new Uint32Array(4)),
    block_table: buffer(device, new Uint32Array(4)),
    scales: buffer(device, new Uint32Array(4)),
  };
  const decodeGrid = [splits, Math.ceil(rows / decode.constants.BLOCK_R), p.batch * p.kvHeads];
  const merge = { rows: queryRows, dim: p.dim, splits };
  const [o, l] = await dispatch(
    device,
    [
      [decode, decodePipeline, decodeBuffers, decodeGrid],
      combineStep(device, combine, combinePipeline, merge, partialOut, partialLse, out, lse),
    ],
    [out, lse],
  );
  return { out: o.subarray(0, queryRows * p.dim), lse: l.subarray(0, queryRows) };
}

/** An attention problem: `spec` with its defaults filled in and seeded random inputs. */
function problem(spec) {
  const { seed, batch = 1, qHeads = 2, kvHeads = qHeads, nQ, nK, dQk, dV = dQk } = spec;
  const { window = [-1, -1], sinks = 0, softcap = 0 } = spec;
  const rng = random(seed);
  return {
    ...spec,
    batch, qHeads, kvHeads, nQ, nK, dQk, dV, window, sinks, softcap,
    scale: Math.fround(1 / Math.sqrt(dQk)),
    q: randomArray(batch * qHeads * nQ * dQk, rng, 2),
    k: randomArray(batch * kvHeads * nK * dQk, rng, 2),
    v: randomArray(batch * kvHeads * nK * dV, rng),
  };
}

// Head 0: three documents, causal inside each; head 1: a pattern with partial tiles
// everywhere, keys 32..47 hidden (empty tiles) and queries 40..43 that see nothing.
const DOCUMENTS = [13, 30, 21];
function documentOf(i) {
  let end = 0;
  for (let d = 0; d < DOCUMENTS.length; d++) if (i < (end += DOCUMENTS[d])) return d;
  return DOCUMENTS.length;
}
function exampleMask(_b, h, i, j) {
  if (h === 0) return documentOf(i) === documentOf(j) && j <= i;
  if (j >= 32 && j < 48) return false;
  if (i >= 40 && i < 44) return false;
  return j % 3 !== 0 || (i + j) % 5 === 0;
}

const FLASH_CASES = [
  { name: 'dense 37x45 d40', nQ: 37, nK: 45, dQk: 40 },
  { name: 'causal nQ > nK 50x21 d40', nQ: 50, nK: 21, dQk: 40, window: [-1, 0] },
  { name: 'window (9,4) sinks 3 softcap 2 70x70 d40', nQ: 70, nK: 70, dQk: 40, window: [9, 4], sinks: 3, softcap: 2 },
  { name: 'GQA 4/2 batch 2 dqk 90 dv 30 19x33', batch: 2, qHeads: 4, kvHeads: 2, nQ: 19, nK: 33, dQk: 90, dV: 30 },
  // Wide heads: rows shared by 4 threads (with subgroup reads, partial scores summed by shuffles).
  { name: 'causal 40x70 d160', nQ: 40, nK: 70, dQk: 160, window: [-1, 0] },
  {
    name: 'block mask per head, broadcast over batch 2, GQA 2/1 64x64 d40',
    batch: 2, qHeads: 2, kvHeads: 1, nQ: 64, nK: 64, dQk: 40,
    blockSparse: true, mask: exampleMask, maskBatch: 1, maskHeads: 2,
  },
];

/**
 * A KV cache problem: `capacity` slots, of which `slotPositions.length` are filled, slot j
 * with the token at stream position slotPositions[j]; `seen` tokens appended so far, the
 * queries being the last `nQ` of them.
 */
function decodeProblem({ seed, batch = 1, qHeads, kvHeads, nQ, dim, capacity, seen, keysPerSplit, slotPositions }) {
  const len = slotPositions.length;
  const rng = random(seed);
  const slots = batch * kvHeads * capacity;
  const positions = new Uint32Array(slots).fill(EMPTY_SLOT);
  for (let s = 0; s < batch * kvHeads; s++) positions.set(slotPositions, s * capacity);
  const p = {
    batch, qHeads, kvHeads, nQ, dim, capacity, len, seen, keysPerSplit, positions,
    scale: Math.fround(1 / Math.sqrt(dim)),
    q: randomArray(batch * qHeads * nQ * dim, rng, 2),
    cacheK: randomArray(slots * dim, rng, 2),
    cacheV: randomArray(slots * dim, rng),
  };
  // The same problem as plain attention over the filled slots: query i (at position
  // seen - nQ + i) sees the slots whose token is at or before it.
  const filled = (cache) => {
    const x = new Float32Array(batch * kvHeads * len * dim);
    for (let s = 0; s < batch * kvHeads; s++) {
      x.set(cache.subarray(s * capacity * dim, (s * capacity + len) * dim), s * len * dim);
    }
    return x;
  };
  p.attention = {
    batch, qHeads, kvHeads, nQ, nK: len, dQk: dim, dV: dim, window: [-1, -1], sinks: 0, softcap: 0,
    scale: p.scale, q: p.q, k: filled(p.cacheK), v: filled(p.cacheV),
    mask: (b, h, i, j) => positions[(b * kvHeads + Math.floor(h / (qHeads / kvHeads))) * capacity + j] <= seen - nQ + i,
  };
  return p;
}

/**
 * The tokens of decode problem `p` (slots in stream order) in a page pool of 2^pageShift-token
 * pages, each sequence's pages in a shuffled order, rows padded to whole words, as
 * src/kv/paged.rs lays them out: { pageShift, k, v, tables } (tables: each sequence's entry
 * (seen, table start, slots, 0), then the block tables).
 */
function pagedLayout(p, pageShift, seed) {
  const page = 1 << pageShift;
  const words = Math.ceil(p.dim / 4);
  const perSequence = Math.ceil(p.len / page);
  const pages = p.batch * perSequence + 1; // one page no table names
  const order = Array.from({ length: pages }, (_, i) => i);
  const rng = random(seed);
  for (let i = pages - 1; i > 0; i--) {
    const j = Math.floor(((rng() + 1) / 2) * (i + 1)) % (i + 1);
    [order[i], order[j]] = [order[j], order[i]];
  }
  const k = new Float32Array(pages * p.kvHeads * page * words * 4);
  const v = new Float32Array(k.length);
  const tables = new Uint32Array(4 * p.batch + p.batch * perSequence);
  for (let b = 0; b < p.batch; b++) {
    const start = 4 * p.batch + b * perSequence;
    tables.set([p.seen, start, p.len, 0], 4 * b);
    for (let t = 0; t < perSequence; t++) tables[start + t] = order[b * perSequence + t];
    for (let h = 0; h < p.kvHeads; h++) {
      for (let j = 0; j < p.len; j++) {
        const to = ((tables[start + (j >> pageShift)] * p.kvHeads + h) * page + (j % page)) * words * 4;
        const from = ((b * p.kvHeads + h) * p.capacity + j) * p.dim;
        k.set(p.cacheK.subarray(from, from + p.dim), to);
        v.set(p.cacheV.subarray(from, from + p.dim), to);
      }
    }
  }
  return { pageShift, k, v, tables };
}

/** Where StreamingLLM's ring puts each of `seen` tokens: sinks first, then slot sinks + (t - sinks) % window. */
function ring(sinks, window, seen) {
  const positions = [];
  for (let t = 0; t < seen; t++) positions[t < sinks ? t : sinks + ((t - sinks) % window)] = t;
  return positions;
}

const DECODE_CASES = [
  {
    name: 'decode GQA 8/2, 1 query, 150 of 160 slots in order, 2 splits of up to 100, d40',
    qHeads: 8, kvHeads: 2, nQ: 1, dim: 40, capacity: 160, seen: 150, keysPerSplit: 100,
    slotPositions: ring(0, 160, 150),
  },
  {
    name: 'decode chunk of 5 queries, group 2, batch 2, ring of 4 sinks + 36 after 90 tokens, 5 splits, d40',
    batch: 2, qHeads: 4, kvHeads: 2, nQ: 5, dim: 40, capacity: 40, seen: 90, keysPerSplit: 8,
    slotPositions: ring(4, 36, 90),
  },
  {
    name: 'decode GQA 4/2, chunk of 2 queries, 20 of 24 slots, 3 splits of up to 7, d38 (rows off the 4-element words)',
    qHeads: 4, kvHeads: 2, nQ: 2, dim: 38, capacity: 24, seen: 20, keysPerSplit: 7,
    slotPositions: ring(0, 24, 20),
  },
];

function byConstants(variants, kernel, wanted) {
  return variants.filter(
    (v) =>
      v.kernel === kernel &&
      v.dtype === 'f32' &&
      Object.entries(wanted).every(([name, x]) => v.constants[name] === x),
  );
}

const pad16 = (d) => Math.ceil(d / 16) * 16;
// decode.wgsl's D_PAD (src/kv/decode.rs): a power of two, at least 16 and 4 words per lane.
const decodePad = (d, lanes) => Math.max(16, 4 * lanes, 2 ** Math.ceil(Math.log2(d)));
const presetOf = (v) => tilesOf(v.constants);
const isOneSubgroup = (device, v) => {
  const info = device.adapterInfo || {};
  const threads = v.workgroup_size[0] * v.workgroup_size[1] * v.workgroup_size[2];
  return info.subgroupMinSize === threads && info.subgroupMaxSize === threads;
};
const constantsText = (v) => Object.entries(v.constants).map(([n, x]) => `${n}=${x}`).join(' ');

/**
 * Every run: [kernel, name, variants it uses, run() -> error or null]. The flash cases run
 * on every admitted f32 variant of their head dims (each tile preset);
 * the decode cases on the decode variants of their head dim (without RoPE or logits) with
 * the fewest and the most rows per workgroup, for each number of lanes per key (the CPU
 * and the GPU presets).
 */
export function caseList(device, variants) {
  const runs = [];
  for (const spec of FLASH_CASES) {
    const p = problem({ seed: runs.length + 1, ...spec });
    const candidates = byConstants(variants, 'flash_fwd', {
      DQK_PAD: pad16(p.dQk),
      DV_PAD: pad16(p.dV),
      ALIGNED: p.dQk % 4 === 0 && p.dV % 4 === 0,
      QK_TAIL: pad16(p.dQk) !== p.dQk,
      BLOCK_SPARSE: !!spec.blockSparse,
      VARLEN: false,
    });
    if (candidates.length === 0) {
      runs.push(['flash_fwd', spec.name, [], async () => 'no admitted variant for these head dims']);
    }
    // Subgroup K/V reads need the workgroup to be exactly one subgroup (SwiftShader's are 4
    // threads, the CPU preset's workgroups 8): as the host, run them only where it is.
    for (const v of candidates.filter((v) => !v.subgroups || isOneSubgroup(device, v))) {
      const name = `${spec.name} | preset ${presetOf(v)} ${constantsText(v)}`;
      runs.push(['flash_fwd', name, [v], async ([pipeline]) => judge(p, await runFlash(device, v, pipeline, p))]);
    }
  }
  runs.push(...varlenRuns(device, variants, runs.length));
  const [combine] = byConstants(variants, 'combine', {});
  // Each decode case on the dense kernel, and those whose slots are in stream order also on
  // the paged one (f32 pool, pages of 4 tokens in a shuffled order).
  const inOrder = (spec) => spec.slotPositions.every((position, slot) => position === slot);
  const decodeRuns = DECODE_CASES.flatMap((spec) => [[spec, false], ...(inOrder(spec) ? [[spec, true]] : [])]);
  for (const [spec, isPaged] of decodeRuns) {
    const p = decodeProblem({ seed: 100 + runs.length, ...spec });
    const paged = isPaged ? pagedLayout(p, 2, 7 + runs.length) : null;
    const candidates = byConstants(variants, 'decode', {
      ALIGNED_ROWS: isPaged || p.dim % 4 === 0,
      ROPE: false,
      LOGITS: false,
      PAGED: isPaged,
      INT8: false,
    }).filter((v) => v.constants.D_PAD === decodePad(p.dim, v.constants.LANES));
    const chosen = candidates.filter((v, i) => {
      const same = candidates.filter((w) => w.constants.LANES === v.constants.LANES);
      const rowsPerBlock = same.map((w) => w.constants.BLOCK_R);
      const extreme = v.constants.BLOCK_R === Math.min(...rowsPerBlock) || v.constants.BLOCK_R === Math.max(...rowsPerBlock);
      const first = candidates.findIndex((w) => w.constants.LANES === v.constants.LANES && w.constants.BLOCK_R === v.constants.BLOCK_R);
      return extreme && first === i;
    });
    const name = isPaged ? `paged ${spec.name}` : spec.name;
    if (chosen.length === 0 || !combine) {
      runs.push(['decode', name, [], async () => 'no admitted decode or combine variant']);
    }
    for (const v of chosen) {
      runs.push([
        'decode',
        `${name} | ${constantsText(v)}`,
        [v, combine],
        async ([decodePipeline, combinePipeline]) =>
          judge(p.attention, await runDecode(device, [v, decodePipeline], [combine, combinePipeline], p, paged)),
      ]);
    }
  }
  if (combine) {
    const name = 'combine of 3 partials with -inf partials and a row with none, dim 20';
    runs.push(['combine', name, [combine], (pipelines) => combineAlone(device, combine, pipelines)]);
  }
  runs.push(...backwardRuns(device, variants, runs.length));
  return runs;
}

/** combine.wgsl alone on partials where some rows saw no key in some splits, one in none. */
async function combineAlone(device, combine, [pipeline]) {
  const [splits, rows, dim] = [3, 7, 20];
  const rng = random(7);
  const partialOut = randomArray(splits * rows * dim, rng);
  const partialLse = randomArray(splits * rows, rng, 4);
  for (const [s, r] of [[0, 1], [1, 1], [2, 1], [0, 3], [2, 5], [1, 6]]) partialLse[s * rows + r] = -Infinity;
  const out = sentinel(device, rows * dim);
  const lse = sentinel(device, rows);
  const m = { rows, dim, splits };
  const [partials, partialLses] = [buffer(device, partialOut), buffer(device, partialLse)];
  const step = combineStep(device, combine, pipeline, m, partials, partialLses, out, lse);
  const [o, l] = await dispatch(device, [step], [out, lse]);
  const got = { out: o.subarray(0, rows * dim), lse: l.subarray(0, rows) };
  return judgeMerge(merge(partialOut, partialLse, splits, rows, dim), got);
}

// ---------------------------------------------------------------------------------------
// Varlen: sequences packed along the sequence axis of one batch (src/attention/varlen.rs),
// every option per sequence (causal bottom-right to each sequence's own lengths), judged
// sequence by sequence against the reference on that sequence alone.

/**
 * A varlen problem: `spec` (with `seqlensQ` and `seqlensK`, one entry per sequence) packed
 * into one batch of `sum(seqlensQ)` queries and `sum(seqlensK)` keys; `packed` holds the
 * lengths, each sequence's first rows, the longest lengths and, for a block mask (whose
 * batch axis is the sequence, for the longest lengths, each sequence reading its top-left
 * corner), the grid it is built on.
 */
function varlenProblem(spec) {
  const { seqlensQ, seqlensK } = spec;
  const sum = (xs) => xs.reduce((a, b) => a + b, 0);
  const starts = (xs) => xs.map((_, s) => sum(xs.slice(0, s)));
  const p = problem({ ...spec, batch: 1, nQ: sum(seqlensQ), nK: sum(seqlensK) });
  const [maxQ, maxK] = [Math.max(...seqlensQ), Math.max(...seqlensK)];
  p.packed = { seqlensQ, seqlensK, qStarts: starts(seqlensQ), kStarts: starts(seqlensK), maxQ, maxK };
  p.packed.maskGrid = { nQ: maxQ, nK: maxK, mask: spec.mask };
  if (spec.blockSparse) p.maskBatch = seqlensQ.length;
  return p;
}

// The u32 words of one SequenceBlock (flash_fwd.wgsl).
const QUERY_BLOCK_WORDS = 6;

/**
 * The SequenceBlock table of src/attention/varlen.rs for blocks of `blockQ` rows, flattened:
 * per block its sequence, its index within the sequence, the sequence's first query and key
 * rows and its lengths; the longest work first (by keys, then later blocks first), as the host
 * orders them. A sequence without queries has no block.
 */
function varlenQueryBlocks(packed, blockQ) {
  const blocks = [];
  packed.seqlensQ.forEach((nQ, s) => {
    const nK = packed.seqlensK[s];
    for (let b = 0; b < Math.ceil(nQ / blockQ); b++) blocks.push([s, b, packed.qStarts[s], packed.kStarts[s], nQ, nK]);
  });
  blocks.sort((a, b) => b[5] - a[5] || b[1] - a[1]);
  return Uint32Array.from(blocks.flat());
}

/** The varlen grid of src/attention/flash.rs: (query block, head) pairs in x, wrapped into z. */
function varlenGrid(device, blocks, heads) {
  const pairs = blocks * heads;
  const x = Math.min(Math.max(pairs, 1), device.limits.maxComputeWorkgroupsPerDimension);
  return [x, 1, Math.ceil(pairs / x)];
}

// Per sequence, a pattern with partial and empty tiles, true beyond the sequence's lengths
// too (the kernel must stay inside each sequence's corner).
function varlenMask(s, _h, i, j) {
  return (i + 2 * j + s) % 7 !== 0 && !(j >= 8 + s && j < 20 + s);
}

// Each case packs a sequence of 1 query and 1 key, one with no keys (rows that see nothing:
// zeros, LSE -inf), one without queries, and sequences with more queries than keys and
// more keys than queries.
const VARLEN_CASES = [
  {
    name: 'varlen causal GQA 4/2, 6 sequences (1x1, 5x0, 40x23, 9x50, 0x4, 70x70) d64',
    qHeads: 4, kvHeads: 2, dQk: 64, window: [-1, 0],
    seqlensQ: [1, 5, 40, 9, 0, 70], seqlensK: [1, 0, 23, 50, 4, 70],
  },
  {
    name: 'varlen window (7,2) sinks 2 softcap 3, 4 sequences (33x20, 1x45, 12x0, 1x1) dqk 37 dv 21',
    dQk: 37, dV: 21, window: [7, 2], sinks: 2, softcap: 3,
    seqlensQ: [33, 1, 12, 1], seqlensK: [20, 45, 0, 1],
  },
  {
    name: 'varlen causal block mask per sequence, 4 sequences (30x40, 1x1, 17x0, 45x33) d64',
    dQk: 64, window: [-1, 0], seqlensQ: [30, 1, 17, 45], seqlensK: [40, 1, 0, 33],
    blockSparse: true, mask: varlenMask, maskHeads: 1,
  },
];

/** The varlen runs: each case on every admitted f32 varlen variant of its head dims. */
function varlenRuns(device, variants, seed) {
  const runs = [];
  for (const [n, spec] of VARLEN_CASES.entries()) {
    const p = varlenProblem({ seed: seed + n + 1, ...spec });
    const candidates = byConstants(variants, 'flash_fwd', {
      DQK_PAD: pad16(p.dQk),
      DV_PAD: pad16(p.dV),
      ALIGNED: p.dQk % 4 === 0 && p.dV % 4 === 0,
      QK_TAIL: pad16(p.dQk) !== p.dQk,
      BLOCK_SPARSE: !!spec.blockSparse,
      VARLEN: true,
    }).filter((v) => !v.subgroups || isOneSubgroup(device, v));
    if (candidates.length === 0) runs.push(['flash_fwd', spec.name, [], async () => 'no admitted varlen variant']);
    for (const v of candidates) {
      const name = `${spec.name} | preset ${presetOf(v)} ${constantsText(v)}`;
      runs.push(['flash_fwd', name, [v], async ([pipeline]) => judgeVarlen(p, await runFlash(device, v, pipeline, p))]);
    }
  }
  return runs;
}

// The flash backward (flash_bwd.wgsl), as src/attention/backward.rs runs it on dense options:
// query blocks of 32 rows and key tiles of 16, the preprocess on 64 rows per workgroup, 32
// keys per register-tiled dK/dV workgroup (WIDE_KEYS_WG per `dkdv_wide` one), and one pass
// each (PassRange over every (query head of the group, query block) pair, and every key).
const BACKWARD_TILES = { BLOCK_Q: 32, BLOCK_K: 16 };
const BACKWARD_ROW_WORKGROUP = 64;
const BACKWARD_TILED_KEYS = 32;
// The widest padded head dim of the register-tiled passes without a split over threads
// (TILED_DIM); wider heads split only where a workgroup is one subgroup of 8, so here they
// take the wide passes.
const BACKWARD_TILED_DIM = 64;

const BACKWARD_CASES = [
  { name: 'backward causal nQ > nK 50x40 d64', nQ: 50, nK: 40, dQk: 64, window: [-1, 0] },
  {
    name: 'backward window (9,4) sinks 3 45x45 dqk 37 dv 21',
    nQ: 45, nK: 45, dQk: 37, dV: 21, window: [9, 4], sinks: 3,
  },
  {
    name: 'backward GQA 4/2 batch 2 softcap 2 19x33 d40',
    batch: 2, qHeads: 4, kvHeads: 2, nQ: 19, nK: 33, dQk: 40, softcap: 2,
  },
  // Wide heads: one key or query row per thread (dkdv_wide, dq_wide; SwiftShader's subgroups
  // are 4 threads, so the split passes do not run here).
  { name: 'backward MQA 3/1 causal 40x70 d128', qHeads: 3, kvHeads: 1, nQ: 40, nK: 70, dQk: 128, window: [-1, 0] },
];

/** `x` padded with zeros to whole vec4 words: the backward reads Q, K, V and dO by words. */
function inWords(x) {
  const padded = new Float32Array(Math.ceil(x.length / 4) * 4);
  padded.set(x);
  return padded;
}

/**
 * The backward's three dispatches on problem `p` with loss gradient `dOut`, from the forward's
 * `forward` ({ out, lse }, natural-log LSE): preprocess, the dK/dV pass over key blocks, the
 * dQ pass over query blocks. Returns { dq, dk, dv }.
 */
async function runBackward(device, variants, pipelines, p, dOut, forward) {
  const [preprocess, dkdv, dq] = variants;
  const rows = p.batch * p.qHeads * p.nQ;
  const keyRows = p.batch * p.kvHeads * p.nK;
  const qBlocks = Math.ceil(p.nQ / BACKWARD_TILES.BLOCK_Q);
  const keysPerWorkgroup = dkdv.entry_point === 'dkdv_wide' ? dkdv.constants.WIDE_KEYS_WG : BACKWARD_TILED_KEYS;
  const range = (variant, end) => {
    const bytes = packStruct(layoutOf(variant, 'range'), { begin: 0, end, flags: FIRST_PASS | LAST_PASS, table_at: 0 }, null, 'range');
    return buffer(device, bytes, GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST);
  };
  const gradients = { dq: sentinel(device, rows * p.dQk), dk: sentinel(device, keyRows * p.dQk) };
  gradients.dv = sentinel(device, keyRows * p.dV);
  const buffers = {
    params: uniformBuffer(device, preprocess, attentionParams(p)),
    q: buffer(device, inWords(p.q)),
    k: buffer(device, inWords(p.k)),
    v: buffer(device, inWords(p.v)),
    out: buffer(device, forward.out),
    d_out: buffer(device, inWords(dOut)),
    lse: buffer(device, forward.lse),
    state: buffer(device, new Float32Array(2 * rows)), // the row statistics; one pass carries nothing
    block_mask: buffer(device, new Uint32Array(8)), // the dense variants never read it, but their layouts have it
    ...gradients,
  };
  const group = p.qHeads / p.kvHeads;
  const steps = [
    [preprocess, pipelines[0], buffers, [Math.ceil(rows / BACKWARD_ROW_WORKGROUP), 1, 1]],
    [dkdv, pipelines[1], { ...buffers, range: range(dkdv, group * qBlocks) }, [Math.ceil(p.nK / keysPerWorkgroup), p.kvHeads, p.batch]],
    [dq, pipelines[2], { ...buffers, range: range(dq, p.nK) }, [qBlocks, p.qHeads, p.batch]],
  ];
  const [gq, gk, gv] = await dispatch(device, steps, [gradients.dq, gradients.dk, gradients.dv]);
  return { dq: gq.subarray(0, rows * p.dQk), dk: gk.subarray(0, keyRows * p.dQk), dv: gv.subarray(0, keyRows * p.dV) };
}

/**
 * The backward runs: each case on the f32 dense-tile variants of its head dims, once without
 * subgroup shuffles and once with them where each pass's workgroup is exactly one subgroup
 * (as the host picks them). The forward's O and LSE come from the f64 reference, rounded to f32.
 */
function backwardRuns(device, variants, seed) {
  const runs = [];
  for (const spec of BACKWARD_CASES) {
    const p = problem({ seed: seed + runs.length + 1, ...spec });
    const dOut = randomArray(p.batch * p.qHeads * p.nQ * p.dV, random(seed + 1000 + runs.length));
    const reference = attention(p);
    const forward = { out: Float32Array.from(reference.out), lse: Float32Array.from(reference.lse) };
    const candidates = byConstants(variants, 'flash_bwd', {
      ...BACKWARD_TILES,
      DQK_PAD: pad16(p.dQk),
      DV_PAD: pad16(p.dV),
      ALIGNED: p.dQk % 4 === 0 && p.dV % 4 === 0,
      BLOCK_SPARSE: false,
      VARLEN: false,
    });
    const wide = Math.max(pad16(p.dQk), pad16(p.dV)) > BACKWARD_TILED_DIM;
    const [dkdvEntry, dqEntry] = wide ? ['dkdv_wide', 'dq_wide'] : ['dkdv_pass', 'dq_pass'];
    const preprocess = candidates.find((v) => v.entry_point === 'preprocess');
    const passes = [false, true].map((shuffle) =>
      [dkdvEntry, dqEntry].map((entry) =>
        candidates.find((v) => v.entry_point === entry && v.constants.SHUFFLE_ROWS === shuffle),
      ),
    );
    const runnable = passes.filter(
      (pair) => pair.every(Boolean) && pair.every((v) => !v.subgroups || isOneSubgroup(device, v)),
    );
    if (!preprocess || runnable.length === 0) {
      runs.push(['flash_bwd', spec.name, [], async () => 'no admitted backward variant for these head dims']);
    }
    for (const [dkdv, dq] of preprocess ? runnable : []) {
      const uses = [preprocess, dkdv, dq];
      const name = `${spec.name} | ${dkdv.entry_point} ${dq.entry_point} SHUFFLE_ROWS=${dkdv.constants.SHUFFLE_ROWS}`;
      runs.push([
        'flash_bwd',
        name,
        uses,
        async (pipelines) => judgeBackward(p, dOut, await runBackward(device, uses, pipelines, p, dOut, forward)),
      ]);
    }
  }
  return runs;
}
