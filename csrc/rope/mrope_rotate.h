// M-RoPE rotation of q and k on the CPU (apply_mrope's "cpu" backend and its backward):
//
//   θ_j = float(position_ids[axis[j], b, s]) · inv_freq[j]      (fp32, j < D/2; axis: the frequency layout)
//   (x_j, x_{j+D/2}) → (x_j c − x_{j+D/2} s', x_{j+D/2} c + x_j s'),  c = scale·cos θ_j,  s' = ±scale·sin θ_j
//
// for every head of q [B,S,Hq,D] and k [B,S,Hkv,D] (any strides over B, S, H; unit stride over D) into the
// contiguous q_out, k_out; s' = −scale·sin θ for the inverse rotation (the backward). One parallel region
// per call over the tokens: the angles of a token are made once and shared by its heads.
#pragma once

#include <ATen/ATen.h>

namespace clinkd {

void mrope_rotate_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_out, const at::Tensor& k_out,
                      const at::Tensor& position_ids, const at::Tensor& inv_freq, const at::Tensor& axis, double scale,
                      bool inverse);

}  // namespace clinkd
