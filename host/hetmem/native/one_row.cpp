// hetmem's native one-row decode step (DSA, Quest, SeerAttention-R): a wrapped model's decode
// step at batch 1 (a decode token appended, the method's index brought up to date,
// Relevancy's scores, the top-k and the attention over the selected rows), as the Python
// lean path (`lean_one`) runs it, so every result equals the Python path's to the bit
// (tests/test_native.py, tests/test_lean_decode.py). Mostly the same ATen operators in the
// same order; where a few small operators cost more than the work (a block's max and min,
// the top-k's k-th value and its scan, the gather of the selected units, the mask), a loop
// whose result is exact by construction (comparisons and copies do not round). What it
// saves is the Python between the ~40 operators of a layer-step and those small operators'
// own costs (bench/decode_floor.py, bench/decode_e2e.py's B=1 overhead). Registered as
// torch.ops.hetmem_native.*; the Python side checks what each op assumes, reserves the
// buffers and keeps the lengths.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <vector>

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

// `pool_blocks` of one block: keys [B, H, count, D] (a view of the buffer) -> [B, H, 1, 3D]
// in their dtype, max | min | mean over the tokens. The max and min in one pass over the
// rows (exact: a comparison does not round, and the keys were screened finite), the mean
// by the operator the Python path calls (its summation order is the operator's own).
at::Tensor pool_block(const at::Tensor& block) {
  int64_t b = block.size(0), h = block.size(1), count = block.size(2), d = block.size(3);
  auto pooled = at::empty({b, h, 1, 3 * d}, block.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, block.scalar_type(), "pool", [&] {
    const scalar_t* base = block.const_data_ptr<scalar_t>();
    scalar_t* out = pooled.mutable_data_ptr<scalar_t>();
    int64_t sb = block.stride(0), sh = block.stride(1), st = block.stride(2), sd = block.stride(3);
    using acc_t = at::opmath_type<scalar_t>;  // (holds each key exactly)
    std::vector<acc_t> top(d), bottom(d);
    for (int64_t i = 0; i < b; ++i) {
      for (int64_t j = 0; j < h; ++j) {
        const scalar_t* row = base + i * sb + j * sh;
        for (int64_t c = 0; c < d; ++c) top[c] = bottom[c] = row[c * sd];
        for (int64_t t = 1; t < count; ++t) {
          const scalar_t* r = row + t * st;
          for (int64_t c = 0; c < d; ++c) {
            acc_t x = r[c * sd];
            top[c] = x > top[c] ? x : top[c];
            bottom[c] = x < bottom[c] ? x : bottom[c];
          }
        }
        scalar_t* o = out + (i * h + j) * 3 * d;
        for (int64_t c = 0; c < d; ++c) {
          o[c] = static_cast<scalar_t>(top[c]);
          o[d + c] = static_cast<scalar_t>(bottom[c]);
        }
      }
    }
  });
  pooled.narrow(-1, 2 * d, d).copy_(block.mean(-2, /*keepdim=*/true));
  return pooled;
}

// `_lean_selection`'s top k of scores [1, G, 1, n] (`selection._top_indices`): per row, the
// indices, ascending, of the scores above its k-th largest and, of those equal to it, the
// ones of lowest index that fill k; [1, G, 1, k]. An undefined tensor where a score is NaN
// (the caller's Python path says so). The k-th value by a selection over a copy (the value
// is the same however it is found), then one scan.
at::Tensor pick_rows(const at::Tensor& scores, int64_t k) {
  auto flat = scores.contiguous();
  int64_t groups = flat.size(1), n = flat.size(-1);
  TORCH_CHECK(k >= 1 && k <= n, "one_row_attend: k=", k, " of ", n, " scores");
  auto rows = at::empty({1, groups, 1, k}, flat.options().dtype(at::kLong));
  int64_t* out = rows.mutable_data_ptr<int64_t>();
  bool finite_order = true;  // (no NaN)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, flat.scalar_type(), "pick", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // (holds each score exactly)
    const scalar_t* base = flat.const_data_ptr<scalar_t>();
    std::vector<acc_t> copy(n);
    for (int64_t g = 0; g < groups && finite_order; ++g) {
      const scalar_t* row = base + g * n;
      for (int64_t j = 0; j < n; ++j) {
        copy[j] = static_cast<acc_t>(row[j]);
        if (std::isnan(copy[j])) finite_order = false;
      }
      if (!finite_order) break;
      std::nth_element(copy.begin(), copy.begin() + (k - 1), copy.end(), std::greater<acc_t>());
      acc_t kth = copy[k - 1];
      int64_t above = 0;
      for (int64_t j = 0; j < n; ++j) above += static_cast<acc_t>(row[j]) > kth;
      int64_t ties = k - above, found = 0;  // (ties >= 1: the k-th itself is one)
      for (int64_t j = 0; found < k; ++j) {
        acc_t x = static_cast<acc_t>(row[j]);
        if (x > kth || (x == kth && ties-- > 0)) out[g * k + found++] = j;
      }
    }
  });
  return finite_order ? rows : at::Tensor();
}

// The selected units' rows of a buffer [1, Hkv, S, W] (contiguous) side by side,
// [1, Hkv, k * unit, W]: rows [1, G, 1, k] (G = 1: the same units for every KV head). A
// unit that runs past S (a buffer not laid out in whole units) has its rows past S zeros
// (past the cache's end: hidden).
at::Tensor gather_units(const at::Tensor& buffer, const at::Tensor& rows, int64_t unit) {
  TORCH_CHECK(buffer.is_contiguous(), "one_row_attend: the KV buffers must be contiguous");
  int64_t hkv = buffer.size(1), length = buffer.size(2), width = buffer.size(3);
  int64_t groups = rows.size(1), k = rows.size(3);
  TORCH_CHECK(groups == 1 || groups == hkv, "one_row_attend: ", groups,
              " selections for ", hkv, " KV heads (one, or one per KV head)");
  auto out = at::empty({1, hkv, k * unit, width}, buffer.options());
  const char* src = static_cast<const char*>(buffer.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  const int64_t* picks = rows.const_data_ptr<int64_t>();
  int64_t token = width * buffer.element_size();
  for (int64_t h = 0; h < hkv; ++h) {
    for (int64_t j = 0; j < k; ++j) {
      int64_t first = picks[(groups == 1 ? 0 : h) * k + j] * unit;
      int64_t held = std::max<int64_t>(std::min(unit, length - first), 0);
      char* to = dst + (h * k + j) * unit * token;
      std::memcpy(to, src + (h * length + first) * token, held * token);
      std::memset(to + held * token, 0, (unit - held) * token);
    }
  }
  return out;
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
  int64_t h = kbuf.size(1);
  int64_t first = n / unit, start = first * unit, count = n + 1 - start;
  auto pooled = pool_block(kbuf.narrow(2, start, count));
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
  } else {  // the bmm `qg @ kg.transpose(-1, -2)` folds to
    auto flat = kg.view({hkv, blocks, kg.size(-1)}).transpose(1, 2);
    logits = at::bmm(qg.view({hkv, 1, qg.size(-1)}), flat).view({1, hkv, 1, blocks});
  }
  return {logits.div_(std::sqrt(static_cast<double>(qg.size(-1)))), appended};
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

// `_lean_selection` then `_lean_attention`: the top k of scores [1, G, 1, n] (G = 1: a
// selection shared by the KV heads; G = Hkv: one per KV head; `pick_rows`), the selected
// units' rows (`unit` tokens each) gathered from the buffers (`gather_units`) and one sdpa,
// the tokens at and past `hide_from` (>= 0) hidden by the additive mask sdpa makes of
// `_small_attention`'s boolean one. Returns (out [1, Hq, 1, Dv], picks [1, G, 1, k], the
// selection's seconds); an empty output where a score is NaN.
std::tuple<at::Tensor, at::Tensor, double> one_row_attend(
    const at::Tensor& scores, int64_t k, const at::Tensor& q, const at::Tensor& kbuf,
    const at::Tensor& vbuf, int64_t unit, int64_t hide_from, double scale) {
  double begin = now();
  auto rows = pick_rows(scores, k);
  if (!rows.defined()) return {at::Tensor(), at::Tensor(), 0.0};  // (a NaN score)
  double selected = now() - begin;
  int64_t heads = q.size(1), d = q.size(3), hkv = kbuf.size(1), groups = rows.size(1);
  auto ks = gather_units(kbuf, rows, unit), vs = gather_units(vbuf, rows, unit);
  if (ks.scalar_type() != q.scalar_type() || vs.scalar_type() != q.scalar_type()) {
    ks = ks.to(q.scalar_type());
    vs = vs.to(q.scalar_type());
  }
  std::optional<at::Tensor> mask;
  if (hide_from >= 0) {  // the additive mask sdpa makes of the boolean one (0 seen, -inf not)
    int64_t last = hide_from / unit, rest = hide_from % unit;
    auto additive = at::empty({1, groups, 1, k * unit}, q.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "mask", [&] {
      scalar_t* out = additive.mutable_data_ptr<scalar_t>();
      const int64_t* picks = rows.const_data_ptr<int64_t>();
      const scalar_t seen = 0, hidden = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < groups * k; ++i) {
        bool whole = picks[i] < last;
        for (int64_t t = 0; t < unit; ++t) out[i * unit + t] = whole || t < rest ? seen : hidden;
      }
    });
    mask = additive;
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
