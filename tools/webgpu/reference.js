// Softmax attention on the CPU, written from FlashAttention's conventions (README,
// Conventions), independent of the Rust host and the shaders: the f64 reference the
// kernels are judged against, and the same loops rounded to f32 after every operation
// ("plain" attention in the kernels' precision) for FlashAttention's tolerance rule; the
// same for the gradients of the backward.

/**
 * Whether query `i` sees key `j`: bottom-right aligned window (left, right) of the
 * diagonal i + nK - nQ, -1 unbounded on that side (causal is right = 0), and the first
 * `sinks` keys exempt from the left bound.
 */
export function visible(p, i, j) {
  const [left, right] = p.window;
  const diag = i + p.nK - p.nQ;
  if (right >= 0 && j > diag + right) return false;
  if (left >= 0 && j < diag - left && j >= p.sinks) return false;
  return true;
}

/**
 * O [B, Hq, nQ, dV] and LSE [B, Hq, nQ] of attention on Q [B, Hq, nQ, dQk], K [B, Hkv,
 * nK, dQk], V [B, Hkv, nK, dV], rounding every result with `round`. `p.mask(b, h, i, j)`,
 * if given, also hides keys. Rows that see no key get zeros and LSE = -inf.
 */
function attentionRounded(p, round) {
  const { batch, qHeads, kvHeads, nQ, nK, dQk, dV, q, k, v } = p;
  const out = new Float64Array(batch * qHeads * nQ * dV);
  const lse = new Float64Array(batch * qHeads * nQ);
  const group = qHeads / kvHeads;
  const scores = new Float64Array(nK);
  for (let b = 0; b < batch; b++) {
    for (let h = 0; h < qHeads; h++) {
      const kvh = Math.floor(h / group);
      for (let i = 0; i < nQ; i++) {
        const row = (b * qHeads + h) * nQ + i;
        let max = -Infinity;
        for (let j = 0; j < nK; j++) {
          scores[j] = -Infinity;
          if (!visible(p, i, j) || (p.mask && !p.mask(b, h, i, j))) continue;
          let dot = 0;
          for (let d = 0; d < dQk; d++) {
            dot = round(dot + round(q[row * dQk + d] * k[((b * kvHeads + kvh) * nK + j) * dQk + d]));
          }
          let x = round(dot * p.scale);
          if (p.softcap > 0) x = round(p.softcap * round(Math.tanh(round(x / p.softcap))));
          scores[j] = x;
          max = Math.max(max, x);
        }
        if (max === -Infinity) {
          lse[row] = -Infinity;
          continue;
        }
        let sum = 0;
        for (let j = 0; j < nK; j++) {
          scores[j] = scores[j] === -Infinity ? 0 : round(Math.exp(round(scores[j] - max)));
          sum = round(sum + scores[j]);
        }
        for (let d = 0; d < dV; d++) {
          let acc = 0;
          for (let j = 0; j < nK; j++) {
            if (scores[j] !== 0) acc = round(acc + round(scores[j] * v[((b * kvHeads + kvh) * nK + j) * dV + d]));
          }
          out[row * dV + d] = round(acc / sum);
        }
        lse[row] = round(max + round(Math.log(sum)));
      }
    }
  }
  return { out, lse };
}

const exact = (x) => x;

/** The f64 reference. */
export function attention(p) {
  return attentionRounded(p, exact);
}

/** The largest |got - want|; 0 where both are the same infinity, Infinity for a NaN. */
function maxAbsError(got, want) {
  let worst = 0;
  for (let i = 0; i < want.length; i++) {
    if (got[i] === want[i]) continue;
    const e = Math.abs(got[i] - want[i]);
    worst = Math.max(worst, Number.isNaN(e) ? Infinity : e);
  }
  return worst;
}

function largestFinite(xs) {
  let m = 1;
  for (const x of xs) if (Number.isFinite(x)) m = Math.max(m, Math.abs(x));
  return m;
}

const F32_EPSILON = 2 ** -23;

/**
 * FlashAttention's rule, as the Rust tests apply it: the kernel's largest error against the
 * f64 reference may be at most twice that of plain attention in f32, plus a floor of half
 * an f32 rounding of the largest output (1e-5 of the largest finite LSE for the LSE).
 * Returns null when `got` passes, else what failed with the numbers.
 */
export function judge(p, got) {
  const want = attention(p);
  const plain = attentionRounded(p, Math.fround);
  const bound = {
    out: 2 * maxAbsError(plain.out, want.out) + 0.5 * F32_EPSILON * largestFinite(want.out),
    lse: 2 * maxAbsError(plain.lse, want.lse) + 1e-5 * largestFinite(want.lse),
  };
  const failures = [];
  for (const what of ['out', 'lse']) {
    const err = maxAbsError(got[what], want[what]);
    if (!(err <= bound[what])) {
      const at = worstIndex(got[what], want[what]);
      failures.push(
        `${what === 'out' ? 'O' : 'LSE'} error ${err.toExponential(2)} > bound ${bound[what].toExponential(2)}` +
          ` (at ${at}: got ${got[what][at]}, want ${want[what][at]})`,
      );
    }
  }
  return failures.length ? failures.join('; ') : null;
}

function worstIndex(got, want) {
  let at = 0;
  let worst = -1;
  for (let i = 0; i < want.length; i++) {
    if (got[i] === want[i]) continue;
    const e = Number.isNaN(got[i] - want[i]) ? Infinity : Math.abs(got[i] - want[i]);
    if (e > worst) [worst, at] = [e, i];
  }
  return at;
}

/**
 * The merge of partial results over disjoint key sets, in f64: out = sum_s w_s out_s /
 * sum_s w_s, lse = m + log(sum_s w_s), w_s = exp(lse_s - m), m = max_s lse_s; partials with
 * lse = -inf carry no weight, and a row with no other gets zeros and -inf.
 * `partialOut` [S, rows, dim], `partialLse` [S, rows].
 */
export function merge(partialOut, partialLse, splits, rows, dim) {
  const out = new Float64Array(rows * dim);
  const lse = new Float64Array(rows);
  for (let r = 0; r < rows; r++) {
    let m = -Infinity;
    for (let s = 0; s < splits; s++) m = Math.max(m, partialLse[s * rows + r]);
    if (m === -Infinity) {
      lse[r] = -Infinity;
      continue;
    }
    let sum = 0;
    for (let s = 0; s < splits; s++) {
      const x = partialLse[s * rows + r];
      if (x === -Infinity) continue;
      const w = Math.exp(x - m);
      sum += w;
      for (let c = 0; c < dim; c++) out[r * dim + c] += w * partialOut[(s * rows + r) * dim + c];
    }
    for (let c = 0; c < dim; c++) out[r * dim + c] /= sum;
    lse[r] = m + Math.log(sum);
  }
  return { out, lse };
}

/** A combine result against the f64 merge: f32 roundings of the outputs and LSEs. */
export function judgeMerge(want, got) {
  const failures = [];
  for (const what of ['out', 'lse']) {
    const err = maxAbsError(got[what], want[what]);
    const bound = 8 * F32_EPSILON * largestFinite(want[what]);
    if (!(err <= bound)) failures.push(`${what} error ${err.toExponential(2)} > bound ${bound.toExponential(2)}`);
  }
  return failures.length ? failures.join('; ') : null;
}

/**
 * A varlen result (O and LSE packed like Q, see cases.js varlenProblem) judged sequence by
 * sequence with `judge` against the reference on that sequence alone: its own lengths (so
 * causal and windows align bottom-right to them), its own keys, its corner of `p.mask`
 * (indexed by sequence). Every row is compared, so one written in another sequence's place,
 * or not written (NaN), fails. Returns null, or each failing sequence with what failed.
 */
export function judgeVarlen(p, got) {
  const { seqlensQ, seqlensK, qStarts, kStarts } = p.packed;
  // Rows `start..start + n` of every head of a packed [heads, total, width] array.
  const rows = (x, heads, total, start, n, width) => {
    const part = new Float64Array(heads * n * width);
    for (let h = 0; h < heads; h++) {
      part.set(x.subarray((h * total + start) * width, (h * total + start + n) * width), h * n * width);
    }
    return part;
  };
  const failures = [];
  for (let s = 0; s < seqlensQ.length; s++) {
    const [nQ, nK, q0, k0] = [seqlensQ[s], seqlensK[s], qStarts[s], kStarts[s]];
    if (nQ === 0) continue;
    const alone = {
      ...p,
      nQ,
      nK,
      q: rows(p.q, p.qHeads, p.nQ, q0, nQ, p.dQk),
      k: rows(p.k, p.kvHeads, p.nK, k0, nK, p.dQk),
      v: rows(p.v, p.kvHeads, p.nK, k0, nK, p.dV),
      mask: p.mask && ((_b, h, i, j) => p.mask(s, h, i, j)),
    };
    const gotAlone = { out: rows(got.out, p.qHeads, p.nQ, q0, nQ, p.dV), lse: rows(got.lse, p.qHeads, p.nQ, q0, nQ, 1) };
    const failed = judge(alone, gotAlone);
    if (failed) failures.push(`sequence ${s} (${nQ}x${nK}): ${failed}`);
  }
  return failures.length ? failures.join('; ') : null;
}

/**
 * dQ, dK and dV of attention (as attentionRounded computes it) for the loss gradient `dOut`
 * [B, Hq, nQ, dV], rounding every result with `round`: per row P = softmax(scores), O = P V,
 * D = dO . O, and per visible key dP = dO . V_j, dS = P (dP - D), times 1 - tanh^2 of the
 * capped score under a softcap; dQ += scale dS K_j, dK_j += scale dS Q, dV_j += P dO. GQA's
 * dK and dV sum over the query heads of a KV head. Rows that see no key contribute nothing.
 */
function attentionBackwardRounded(p, dOut, round) {
  const { batch, qHeads, kvHeads, nQ, nK, dQk, dV, q, k, v } = p;
  const dq = new Float64Array(batch * qHeads * nQ * dQk);
  const dk = new Float64Array(batch * kvHeads * nK * dQk);
  const dv = new Float64Array(batch * kvHeads * nK * dV);
  const group = qHeads / kvHeads;
  const raw = new Float64Array(nK); // scale q.k, before the softcap
  const probs = new Float64Array(nK);
  for (let b = 0; b < batch; b++) {
    for (let h = 0; h < qHeads; h++) {
      const kvRows = (b * kvHeads + Math.floor(h / group)) * nK;
      for (let i = 0; i < nQ; i++) {
        const row = (b * qHeads + h) * nQ + i;
        let max = -Infinity;
        for (let j = 0; j < nK; j++) {
          probs[j] = -Infinity;
          if (!visible(p, i, j) || (p.mask && !p.mask(b, h, i, j))) continue;
          let dot = 0;
          for (let d = 0; d < dQk; d++) dot = round(dot + round(q[row * dQk + d] * k[(kvRows + j) * dQk + d]));
          raw[j] = round(dot * p.scale);
          const x = p.softcap > 0 ? round(p.softcap * round(Math.tanh(round(raw[j] / p.softcap)))) : raw[j];
          probs[j] = x;
          max = Math.max(max, x);
        }
        if (max === -Infinity) continue;
        let sum = 0;
        for (let j = 0; j < nK; j++) {
          probs[j] = probs[j] === -Infinity ? 0 : round(Math.exp(round(probs[j] - max)));
          sum = round(sum + probs[j]);
        }
        for (let j = 0; j < nK; j++) probs[j] = round(probs[j] / sum);
        let delta = 0;
        for (let d = 0; d < dV; d++) {
          let o = 0;
          for (let j = 0; j < nK; j++) {
            if (probs[j] !== 0) o = round(o + round(probs[j] * v[(kvRows + j) * dV + d]));
          }
          delta = round(delta + round(dOut[row * dV + d] * o));
        }
        for (let j = 0; j < nK; j++) {
          if (probs[j] === 0) continue;
          let dp = 0;
          for (let d = 0; d < dV; d++) dp = round(dp + round(dOut[row * dV + d] * v[(kvRows + j) * dV + d]));
          let ds = round(probs[j] * round(dp - delta));
          if (p.softcap > 0) {
            const t = round(Math.tanh(round(raw[j] / p.softcap)));
            ds = round(ds * round(1 - round(t * t)));
          }
          const scaled = round(ds * p.scale);
          for (let d = 0; d < dQk; d++) {
            dq[row * dQk + d] = round(dq[row * dQk + d] + round(scaled * k[(kvRows + j) * dQk + d]));
            dk[(kvRows + j) * dQk + d] = round(dk[(kvRows + j) * dQk + d] + round(scaled * q[row * dQk + d]));
          }
          for (let d = 0; d < dV; d++) {
            dv[(kvRows + j) * dV + d] = round(dv[(kvRows + j) * dV + d] + round(probs[j] * dOut[row * dV + d]));
          }
        }
      }
    }
  }
  return { dq, dk, dv };
}

/** The f64 reference gradients. */
export function attentionBackward(p, dOut) {
  return attentionBackwardRounded(p, dOut, exact);
}

/**
 * FlashAttention's rule for the gradients, as the Rust backward tests apply it: each one's
 * largest error against the f64 reference may be at most twice that of the plain f32
 * backward, plus a floor of half an f32 rounding of the largest gradient and what
 * recomputing the weights from an f32 LSE does to it (two roundings of exp(score - LSE),
 * 2 eps (1 + |LSE|) relative). Returns null when `got` ({ dq, dk, dv }) passes, else what
 * failed with the numbers.
 */
export function judgeBackward(p, dOut, got) {
  const want = attentionBackward(p, dOut);
  const plain = attentionBackwardRounded(p, dOut, Math.fround);
  const largestLse = largestFinite(attention(p).lse);
  const failures = [];
  for (const what of ['dq', 'dk', 'dv']) {
    const largest = largestFinite(want[what]);
    const floor = (0.5 + 2 * (1 + largestLse)) * F32_EPSILON * largest;
    const bound = 2 * maxAbsError(plain[what], want[what]) + floor;
    const err = maxAbsError(got[what], want[what]);
    if (!(err <= bound)) {
      const at = worstIndex(got[what], want[what]);
      failures.push(
        `${what} error ${err.toExponential(2)} > bound ${bound.toExponential(2)}` +
          ` (at ${at}: got ${got[what][at]}, want ${want[what][at]})`,
      );
    }
  }
  return failures.length ? failures.join('; ') : null;
}
