// hetmem's native one-row decode step (DSA, Quest, SeerAttention-R): a wrapped model's decode step at batch 1 (a decode
// token appended, the method's index brought up to date, Relevancy's scores, the top-k and
// the attention over the selected rows), as the Python lean path (`lean_one`) runs it: the
// same ATen operators, in the same order, on the same tensors, so every result equals the
// Python path's to the bit (tests/test_native.py). What it saves is the Python between the
// ~40 operators of a layer-step (about 100 us of a 1k-context step on a 2-core CPU,
// bench/decode_floor.py). Registered as torch.ops.hetmem_native.*; the Python side checks
// what each op assumes, reserves the buffers and keeps the lengths.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <chrono>
#include <cmath>
#include <tuple>

namespace {

double now() {
  using clock = std::chrono::steady_clock;
  return std::chrono::duration<double>(clock::now().time_since_epoch()).count();
}

// `KVCache.append_token` of one token at `n` (the buffers reserved by the caller): screened
// as `_check_finite` screens it (the dot product of keys and values is finite only if both
// are), then written. False, nothing written, when the screen does not pass it (the caller
// settles it with the exact check).
bool append_token(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& kbuf,
                  const at::Tensor& vbuf, const at::Tensor& lengths, int64_t n) {
  if (!std::isfinite(at::dot(keys.reshape(-1), values.reshape(-1)).item<double>())) {
    return false;
  }
  kbuf.narrow(2, n, 1).copy_(keys);
  vbuf.narrow(2, n, 1).copy_(values);
  lengths.add_(1);
  return true;
}

}  // namespace

// DSA: the token into the cache and its indexer key into the index (`_lean_index`), then
// `_one_row_scores` over the index's first `span` rows (its padded shape), sliced to the
// n + 1 rows in use. Returns (scores [1, 1, 1, n + 1] or an empty tensor when the token
// was not screened clean: nothing written; the append's seconds).
std::tuple<at::Tensor, double> dsa_one_row(
    const at::Tensor& keys, const at::Tensor& values, const at::Tensor& q,
    const at::Tensor& kbuf, const at::Tensor& vbuf, const at::Tensor& lengths,
    const at::Tensor& index, const at::Tensor& wk, const at::Tensor& blocks, int64_t n,
    int64_t span, double score_scale) {
  double begin = now();
  if (!append_token(keys, values, kbuf, vbuf, lengths, n)) return {at::Tensor(), 0.0};
  auto feats = keys.reshape({keys.size(0), 1, -1}).to(wk.scalar_type());
  index.narrow(1, n, 1).copy_(at::matmul(feats, wk));
  double appended = now() - begin;
  n += 1;
  int64_t hkv = blocks.size(0), d = blocks.size(1), di = blocks.size(2), heads = q.size(1);
  auto qi = at::bmm(q.reshape({hkv, heads / hkv, d}).to(blocks.scalar_type()), blocks);
  at::Tensor logits;
  if (index.scalar_type() == at::kHalf || index.scalar_type() == at::kBFloat16) {
    auto padded = index.narrow(1, 0, span);
    auto cast = qi.scalar_type() == padded.scalar_type() ? qi : qi.to(padded.scalar_type());
    logits = at::bmm(padded, cast.view({1, heads, di}).transpose(1, 2)).narrow(1, 0, n);
    if (logits.scalar_type() != qi.scalar_type()) logits = logits.to(qi.scalar_type());
  } else {
    auto data = index.narrow(1, 0, n);
    if (data.scalar_type() != qi.scalar_type()) data = data.to(qi.scalar_type());
    logits = at::bmm(data, qi.view({1, heads, di}).transpose(1, 2));
  }
  auto scores = logits.relu_().sum(-1);
  return {scores.mul_(score_scale).view({1, 1, 1, n}), appended};
}

// SeerAttention-R: the token into the cache, the gate key of the block it lands in
// (`_lean_index`: the block's keys pooled by max, min and mean through wk), then the gate
// logits of the query (`_one_row_scores`) over the first `blocks` gate keys. Returns
// (logits [1, Hkv, 1, blocks] or an empty tensor when the token was not screened clean;
// the append's seconds).
std::tuple<at::Tensor, double> seer_one_row(
    const at::Tensor& keys, const at::Tensor& values, const at::Tensor& q,
    const at::Tensor& kbuf, const at::Tensor& vbuf, const at::Tensor& lengths,
    const at::Tensor& gate_keys, const at::Tensor& wq, const at::Tensor& wk, int64_t n,
    int64_t unit, int64_t blocks) {
  double begin = now();
  if (!append_token(keys, values, kbuf, vbuf, lengths, n)) return {at::Tensor(), 0.0};
  int64_t b = kbuf.size(0), h = kbuf.size(1), d = kbuf.size(3);
  int64_t first = n / unit, start = first * unit, count = n + 1 - start;
  auto block = kbuf.narrow(2, start, count).view({b, h, 1, count, d});
  auto pooled = at::cat({block.amax(-2), block.amin(-2), block.mean(-2)}, -1);
  auto fresh = at::bmm(pooled.to(wk.scalar_type()).reshape({h, 1, pooled.size(-1)}), wk);
  gate_keys.narrow(2, first, 1).copy_(fresh.view({1, h, 1, wk.size(-1)}));
  double appended = now() - begin;
  int64_t hkv = wq.size(0);
  auto grouped = q.reshape({1, hkv, 1, -1}).to(wq.scalar_type());
  auto qg = at::bmm(grouped.reshape({hkv, 1, grouped.size(-1)}), wq).view({1, hkv, 1, wq.size(-1)});
  auto kg = gate_keys.narrow(2, 0, blocks);
  if (kg.scalar_type() != qg.scalar_type()) kg = kg.to(qg.scalar_type());
  at::Tensor logits;
  if (qg.scalar_type() == at::kHalf || qg.scalar_type() == at::kBFloat16) {
    logits = at::matmul(kg, qg.transpose(-1, -2)).transpose(-1, -2);
  } else {
    logits = at::matmul(qg, kg.transpose(-1, -2));
  }
  return {logits / std::sqrt(static_cast<double>(qg.size(-1))), appended};
}

// Quest: the token into the cache, the bounds of the page it lands in (`page_bounds_step`:
// a new page's max and min are the token, else the running max and min take it), then the
// pages' upper bounds for the query, their max over each KV group (`_one_row_scores`), over
// the first `span` pages of the store (its padded shape, `span` >= 0: a half-precision query
// and store) or the first `pages` (span < 0: the store cast to the query's dtype). `low` and
// `high` [2, D] clamp the query seen twice into [relu(q) | min(q, 0)] (`_sides`). Returns
// (bounds [1, Hkv, 1, pages] or an empty tensor when the token was not screened clean;
// the append's seconds).
std::tuple<at::Tensor, double> quest_one_row(
    const at::Tensor& keys, const at::Tensor& values, const at::Tensor& q,
    const at::Tensor& kbuf, const at::Tensor& vbuf, const at::Tensor& lengths,
    const at::Tensor& bounds, const at::Tensor& low, const at::Tensor& high, int64_t n,
    int64_t unit, int64_t pages, int64_t span) {
  double begin = now();
  if (!append_token(keys, values, kbuf, vbuf, lengths, n)) return {at::Tensor(), 0.0};
  int64_t d = kbuf.size(3);
  auto slot = bounds.narrow(2, n / unit, 1);
  auto key = kbuf.narrow(2, n, 1);
  if (n % unit == 0) {
    slot.unflatten(-1, {2, d}).copy_(
        key.unsqueeze(-2).expand({key.size(0), key.size(1), key.size(2), 2, d}));
  } else {
    auto top = slot.narrow(-1, 0, d), bottom = slot.narrow(-1, d, d);
    at::maximum_out(top, top, key);
    at::minimum_out(bottom, bottom, key);
  }
  double appended = now() - begin;
  int64_t b = q.size(0), heads = q.size(1), t = q.size(2), hkv = kbuf.size(1), r = heads / hkv;
  auto qg = q.reshape({b * hkv, r * t, d});
  auto sides = at::clamp(qg.unsqueeze(2).expand({b * hkv, r * t, 2, d}), low, high)
                   .view({b * hkv, r * t, 2 * d});
  if (span >= 0) {
    auto padded = bounds.narrow(2, 0, span).reshape({b * hkv, span, 2 * d});
    auto bound = at::bmm(padded, sides.transpose(1, 2));
    bound = bound.view({b * hkv, span, r, t}).amax(2).narrow(1, 0, pages);
    return {bound.transpose(1, 2).reshape({b, hkv, t, pages}), appended};
  }
  auto stored = bounds.narrow(2, 0, pages).reshape({b * hkv, pages, 2 * d}).to(q.scalar_type());
  auto bound = at::bmm(sides, stored.transpose(1, 2)).view({b, hkv, r, t, pages});
  return {bound.amax(2), appended};
}

// `_lean_selection` then `_one_row_attention`: the partial top-k of scores [1, G, 1, n]
// (G = 1: a selection shared by the KV heads; G = Hkv: one per KV head), kept when exactly
// k scores of each row are at least its k-th (else an empty output: the caller settles the
// tie), the selected units' rows (`unit` tokens each) gathered from the buffers viewed as
// [Hkv, units, unit * D] and one sdpa, the tokens at and past `hide_from` (>= 0) hidden.
// Returns (out [1, Hq, 1, Dv], picks [1, G, 1, k], the selection's seconds).
std::tuple<at::Tensor, at::Tensor, double> one_row_attend(
    const at::Tensor& scores, int64_t k, const at::Tensor& q, const at::Tensor& kbuf,
    const at::Tensor& vbuf, int64_t unit, int64_t hide_from, double scale) {
  double begin = now();
  auto top = std::get<0>(at::topk(scores, k, -1, /*largest=*/true, /*sorted=*/false));
  auto picked = (scores >= top.amin(-1, /*keepdim=*/true)).nonzero();
  if (picked.size(0) != top.numel()) return {at::Tensor(), at::Tensor(), 0.0};
  auto rows = picked.select(1, picked.size(1) - 1).view(top.sizes());
  double selected = now() - begin;
  int64_t heads = q.size(1), d = q.size(3), hkv = kbuf.size(1), groups = rows.size(1);
  int64_t dk = kbuf.size(3), dv = vbuf.size(3);
  at::Tensor ks, vs;
  if (groups == 1) {
    auto flat = rows.reshape({k});
    ks = kbuf.reshape({hkv, -1, unit * dk}).index_select(1, flat);
    vs = vbuf.reshape({hkv, -1, unit * dv}).index_select(1, flat);
  } else {
    auto bases = at::arange(hkv, rows.options()) * (kbuf.size(2) / unit);
    auto flat = (bases.view({hkv, 1}) + rows.view({hkv, k})).view({-1});
    ks = kbuf.reshape({-1, unit * dk}).index_select(0, flat);
    vs = vbuf.reshape({-1, unit * dv}).index_select(0, flat);
  }
  ks = ks.view({1, hkv, k * unit, -1});
  vs = vs.view({1, hkv, k * unit, -1});
  if (ks.scalar_type() != q.scalar_type() || vs.scalar_type() != q.scalar_type()) {
    ks = ks.to(q.scalar_type());
    vs = vs.to(q.scalar_type());
  }
  std::optional<at::Tensor> mask;
  if (hide_from >= 0) {
    int64_t last = hide_from / unit, rest = hide_from % unit;
    auto first = at::arange(unit, rows.options()) < rest;
    mask = ((rows.reshape({1, groups, k, 1}) < last) | first).view({1, groups, 1, k * unit});
  }
  auto out = at::scaled_dot_product_attention(q.reshape({1, hkv, heads / hkv, d}), ks, vs,
                                              mask, 0.0, false, scale);
  return {out.reshape({1, heads, 1, -1}), rows, selected};
}

TORCH_LIBRARY(hetmem_native, m) {
  m.def(
      "dsa_one_row(Tensor keys, Tensor values, Tensor q, Tensor(a!) kbuf, Tensor(b!) vbuf, "
      "Tensor(c!) lengths, Tensor(d!) index, Tensor wk, Tensor blocks, int n, int span, "
      "float score_scale) -> (Tensor, float)");
  m.def(
      "seer_one_row(Tensor keys, Tensor values, Tensor q, Tensor(a!) kbuf, Tensor(b!) vbuf, "
      "Tensor(c!) lengths, Tensor(d!) gate_keys, Tensor wq, Tensor wk, int n, int unit, "
      "int blocks) -> (Tensor, float)");
  m.def(
      "quest_one_row(Tensor keys, Tensor values, Tensor q, Tensor(a!) kbuf, Tensor(b!) vbuf, "
      "Tensor(c!) lengths, Tensor(d!) bounds, Tensor low, Tensor high, int n, int unit, "
      "int pages, int span) -> (Tensor, float)");
  m.def(
      "one_row_attend(Tensor scores, int k, Tensor q, Tensor kbuf, Tensor vbuf, int unit, "
      "int hide_from, float scale) -> (Tensor, Tensor, float)");
}

TORCH_LIBRARY_IMPL(hetmem_native, CPU, m) {
  m.impl("dsa_one_row", TORCH_FN(dsa_one_row));
  m.impl("seer_one_row", TORCH_FN(seer_one_row));
  m.impl("quest_one_row", TORCH_FN(quest_one_row));
  m.impl("one_row_attend", TORCH_FN(one_row_attend));
}
