// Fused CPU kernels for weight-level stochastic gates.
//
// The pure-TensorFlow gate step (keras_stg.model, `fused=False`) spends a
// dozen elementwise ops per gated kernel: noise, shift, clip, multiply, the
// expected-L0 penalty and their gradients. Each op is a separate pass over
// memory with its own dispatch and allocation, and on a CPU that costs more
// than the whole training step of a small MLP. These kernels do the same math
// in one pass forward and one pass backward:
//
//   eps_i   = table[(start + i) mod M]                (M = table size)
//   u_i     = mu_i + 0.5 + sigma * eps_i
//   z_i     = clip(u_i, 0, 1)
//   value_i = kernel_i * z_i
//   l0      = sum_i 0.5 * (1 + erf((mu_i + 0.5) / sigma / sqrt(2)))
//   kept    = #{i : mu_i > 0}                        (the binary mask's size)
//
//   dmu_i     = [0 <= u_i <= 1] * g_i * kernel_i
//               + g_l0 * exp(-x_i^2 / 2) / (sigma * sqrt(2 pi)),  x_i = (mu_i + 0.5) / sigma
//   dkernel_i = g_i * z_i                              (only if kernel_grad)
//
// StgClip is the gates' bound constraint `clip(mu, -bound, bound)` in one pass
// (TensorFlow's clip is two).
//
// Sums run over fixed chunks whose partial sums are added in chunk order, so
// results do not depend on the thread count or scheduling (bit-identical
// resume relies on it).
//
// Built on first use by keras_stg/fused.py against the installed TensorFlow.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::shape_inference::InferenceContext;

constexpr int64_t kChunk = 16384;

// Calls fn(begin, end, eps) for the pieces of [begin, end) over which the
// noise `table[(start + i) mod m]` is contiguous; eps points at entry `begin`.
void ForNoiseSegments(int64_t begin, int64_t end, int64_t start, int64_t m,
                      const float* table,
                      const std::function<void(int64_t, int64_t, const float*)>& fn) {
  int64_t wrap = m - start;  // first i whose noise index wraps around
  if (begin < wrap) {
    int64_t e = std::min(end, wrap);
    fn(begin, e, table + start + begin);
    begin = e;
  }
  if (begin < end) fn(begin, end, table + (start + begin - m));
}

void ParallelChunks(OpKernelContext* ctx, int64_t n, int64_t cost_per_chunk,
                    const std::function<void(int64_t, int64_t, int64_t)>& fn) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  pool->ParallelFor(chunks, cost_per_chunk, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      fn(c, c * kChunk, std::min(n, (c + 1) * kChunk));
    }
  });
}

// x86-64 builds use portable flags, so a plain build would only use SSE2. The
// elementwise loops are compiled for AVX-512, AVX2 and the baseline, and the
// loader picks the widest one this CPU runs (GCC/Clang function multiversioning).
// Contraction into FMA stays off (-ffp-contract=off), so every version does the
// same per-element arithmetic.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(STG_NO_MULTIVERSION)
#define STG_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define STG_SIMD_CLONES
#endif

// The elementwise loops, written as plain functions over restrict pointers so
// that the compiler vectorises them (captured references would alias).

// u = mu + 0.5 + sigma * eps, the relaxed gate before clipping.
inline float GateInput(float mu, float eps, float sigma) { return (mu + 0.5f) + eps * sigma; }

inline float Clip01(float u) {
  u = u < 0.0f ? 0.0f : u;
  return u > 1.0f ? 1.0f : u;
}
STG_SIMD_CLONES
void KernelGrad(int64_t n, float sigma, const float* __restrict mu, const float* __restrict eps,
                const float* __restrict grad, float* __restrict dkernel) {
  for (int64_t i = 0; i < n; ++i) {
    dkernel[i] = grad[i] * Clip01(GateInput(mu[i], eps[i], sigma));
  }
}

// exp(x) for x <= 0, to about 2e-7 relative: 2^(x log2 e) split into an
// integer power (built in the exponent bits) and a degree-6 polynomial of
// the fraction. Branch-free so that the loops calling it vectorise.
inline float ExpNonPositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float t = x * 1.44269504088896341f;
  int i = static_cast<int>(t);           // truncates towards 0
  i -= (t < static_cast<float>(i)) ? 1 : 0;  // floor
  const float f = t - static_cast<float>(i);  // in [0, 1)
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const int bits = (i + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Standard normal CDF Phi(x) = (1 + erf(x / sqrt 2)) / 2, with the rational
// erf approximation TensorFlow's own erf uses on the CPU (Eigen's
// generic_fast_erf<float>, 3 ulp).
inline float NormalCdf(float x) {
  const float z = x * 0.70710678118654752f;
  float z2 = z * z;
  z2 = z2 > 16.0f ? 16.0f : z2;
  float p = 2.123732201653183437883853912353515625e-06f;
  p = p * z2 + 2.861979592125862836837768554687500000e-04f;
  p = p * z2 + 3.658048342913389205932617187500000000e-03f;
  p = p * z2 + 5.243302136659622192382812500000000000e-02f;
  p = p * z2 + 1.874160766601562500000000000000000000e-01f;
  p = p * z2 + 1.128379106521606445312500000000000000e+00f;
  float q = 3.89185734093189239501953125000e-05f;
  q = q * z2 + 1.14329601638019084930419921875e-03f;
  q = q * z2 + 1.47520881146192550659179687500e-02f;
  q = q * z2 + 1.12945675849914550781250000000e-01f;
  q = q * z2 + 4.99425798654556274414062500000e-01f;
  q = q * z2 + 1.0f;
  float r = z * p / q;
  r = r > 1.0f ? 1.0f : r;
  r = r < -1.0f ? -1.0f : r;
  return 0.5f + 0.5f * r;
}

// value = kernel * clip(u, 0, 1); returns sum Phi((mu + 0.5) / sigma) and
// adds #{mu > 0} to *kept.
STG_SIMD_CLONES
float GateValue(int64_t n, float sigma, const float* __restrict mu, const float* __restrict eps,
                const float* __restrict kernel, float* __restrict out, int64_t* kept) {
  const float inv_sigma = 1.0f / sigma;
  float sum = 0.0f;
  int count = 0;  // n <= kChunk
#pragma omp simd reduction(+ : sum, count)
  for (int64_t i = 0; i < n; ++i) {
    out[i] = kernel[i] * Clip01(GateInput(mu[i], eps[i], sigma));
    sum += NormalCdf((mu[i] + 0.5f) * inv_sigma);
    count += mu[i] > 0.0f ? 1 : 0;
  }
  *kept += count;
  return sum;
}

// dmu = [0 <= u <= 1] * grad * kernel + coef * exp(-x^2 / 2), x = (mu + 0.5) / sigma.
STG_SIMD_CLONES
void GateGrad(int64_t n, float sigma, float coef, const float* __restrict mu,
              const float* __restrict eps, const float* __restrict kernel,
              const float* __restrict grad, float* __restrict dmu) {
  const float inv_sigma = 1.0f / sigma;
  for (int64_t i = 0; i < n; ++i) {
    const float u = GateInput(mu[i], eps[i], sigma);
    const float c = Clip01(u);
    const float gk = grad[i] * kernel[i];
    const float x = (mu[i] + 0.5f) * inv_sigma;
    // d clip(u) / du is 1 inside [0, 1] (where clipping leaves u unchanged).
    dmu[i] = (c == u ? gk : 0.0f) + coef * ExpNonPositive(-0.5f * x * x);
  }
}

absl::Status CheckInputs(const Tensor& kernel, const Tensor& mu, const Tensor& table,
                         const Tensor& start) {
  if (kernel.shape() != mu.shape()) {
    return absl::InvalidArgumentError("kernel and mu must have the same shape, got " +
                                      kernel.shape().DebugString() + " and " +
                                      mu.shape().DebugString());
  }
  if (table.dims() != 1 || table.NumElements() < mu.NumElements()) {
    return absl::InvalidArgumentError("the noise table must be a vector at least as long as mu");
  }
  if (start.dims() != 0) return absl::InvalidArgumentError("start must be a scalar");
  const int64_t s = start.scalar<int64_t>()();
  if (s < 0 || s >= table.NumElements()) {
    return absl::InvalidArgumentError("start must be in [0, table size)");
  }
  return absl::OkStatus();
}

class StgWeightGateOp : public OpKernel {
 public:
  explicit StgWeightGateOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("sigma", &sigma_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& kernel = ctx->input(0);
    const Tensor& mu = ctx->input(1);
    const Tensor& table = ctx->input(2);
    const Tensor& start_t = ctx->input(3);
    OP_REQUIRES_OK(ctx, CheckInputs(kernel, mu, table, start_t));
    Tensor* value = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, kernel.shape(), &value));
    Tensor* l0 = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({}), &l0));
    Tensor* kept = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({}), &kept));

    const int64_t n = mu.NumElements();
    const int64_t m = table.NumElements();
    const int64_t start = start_t.scalar<int64_t>()();
    const float* k = kernel.flat<float>().data();
    const float* mup = mu.flat<float>().data();
    const float* tab = table.flat<float>().data();
    float* out = value->flat<float>().data();
    const float sigma = sigma_;
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    std::vector<float> partial(chunks, 0.0f);
    std::vector<int64_t> partial_kept(chunks, 0);

    ParallelChunks(ctx, n, kChunk * 40, [&](int64_t c, int64_t b, int64_t e) {
      float sum = 0.0f;
      ForNoiseSegments(b, e, start, m, tab, [&](int64_t sb, int64_t se, const float* eps) {
        sum += GateValue(se - sb, sigma, mup + sb, eps, k + sb, out + sb, &partial_kept[c]);
      });
      partial[c] = sum;
    });
    double total = 0.0;
    for (float p : partial) total += p;
    l0->scalar<float>()() = static_cast<float>(total);
    int64_t total_kept = 0;
    for (int64_t p : partial_kept) total_kept += p;
    kept->scalar<int64_t>()() = total_kept;
  }

 private:
  float sigma_;
};

class StgWeightGateGradOp : public OpKernel {
 public:
  explicit StgWeightGateGradOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("sigma", &sigma_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("kernel_grad", &kernel_grad_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& grad = ctx->input(0);
    const Tensor& grad_l0 = ctx->input(1);
    const Tensor& kernel = ctx->input(2);
    const Tensor& mu = ctx->input(3);
    const Tensor& table = ctx->input(4);
    const Tensor& start_t = ctx->input(5);
    OP_REQUIRES_OK(ctx, CheckInputs(kernel, mu, table, start_t));
    OP_REQUIRES(ctx, grad.shape() == mu.shape(),
                absl::InvalidArgumentError("grad must have the shape of mu"));
    Tensor* dmu = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, mu.shape(), &dmu));
    Tensor* dkernel = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            1, kernel_grad_ ? kernel.shape() : TensorShape({0}), &dkernel));

    const int64_t n = mu.NumElements();
    const int64_t m = table.NumElements();
    const int64_t start = start_t.scalar<int64_t>()();
    const float* g = grad.flat<float>().data();
    const float gl0 = grad_l0.scalar<float>()();
    const float* k = kernel.flat<float>().data();
    const float* mup = mu.flat<float>().data();
    const float* tab = table.flat<float>().data();
    float* dm = dmu->flat<float>().data();
    float* dk = kernel_grad_ ? dkernel->flat<float>().data() : nullptr;
    const float sigma = sigma_;
    const float coef = gl0 / (sigma * std::sqrt(2.0f * static_cast<float>(M_PI)));

    ParallelChunks(ctx, n, kChunk * 40, [&](int64_t c, int64_t b, int64_t e) {
      ForNoiseSegments(b, e, start, m, tab, [&](int64_t sb, int64_t se, const float* eps) {
        GateGrad(se - sb, sigma, coef, mup + sb, eps, k + sb, g + sb, dm + sb);
        if (dk != nullptr) KernelGrad(se - sb, sigma, mup + sb, eps, g + sb, dk + sb);
      });
    });
  }

 private:
  float sigma_;
  bool kernel_grad_;
};

STG_SIMD_CLONES
void ClipBound(int64_t n, float bound, const float* __restrict x, float* __restrict y) {
  for (int64_t i = 0; i < n; ++i) {
    float v = x[i] < -bound ? -bound : x[i];
    y[i] = v > bound ? bound : v;
  }
}

// y = clip(x, -bound, bound), in place when x's buffer can be reused.
class StgClipOp : public OpKernel {
 public:
  explicit StgClipOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("bound", &bound_));
  }
  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, x.shape(), &y));
    const float* xp = x.flat<float>().data();
    float* yp = y->flat<float>().data();
    ParallelChunks(ctx, x.NumElements(), kChunk * 2, [&](int64_t c, int64_t b, int64_t e) {
      ClipBound(e - b, bound_, xp + b, yp + b);
    });
  }

 private:
  float bound_;
};

}  // namespace

REGISTER_OP("StgWeightGate")
    .Input("kernel: float")
    .Input("mu: float")
    .Input("table: float")
    .Input("start: int64")
    .Attr("sigma: float")
    .Attr("kernel_grad: bool = false")
    .Output("value: float")
    .Output("expected_l0: float")
    .Output("kept: int64")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->Scalar());
      c->set_output(2, c->Scalar());
      return absl::OkStatus();
    });

REGISTER_OP("StgWeightGateGrad")
    .Input("grad: float")
    .Input("grad_l0: float")
    .Input("kernel: float")
    .Input("mu: float")
    .Input("table: float")
    .Input("start: int64")
    .Attr("sigma: float")
    .Attr("kernel_grad: bool = false")
    .Output("dmu: float")
    .Output("dkernel: float")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(3));
      c->set_output(1, c->UnknownShape());
      return absl::OkStatus();
    });

REGISTER_OP("StgClip")
    .Input("x: float")
    .Attr("bound: float")
    .Output("y: float")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->input(0));
      return absl::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("StgWeightGate").Device(tensorflow::DEVICE_CPU), StgWeightGateOp);
REGISTER_KERNEL_BUILDER(Name("StgWeightGateGrad").Device(tensorflow::DEVICE_CPU),
                        StgWeightGateGradOp);
REGISTER_KERNEL_BUILDER(Name("StgClip").Device(tensorflow::DEVICE_CPU), StgClipOp);
