// CUDA kernels of torch_utils/ops/bias_act.py.
//
// Forward:  y  = clamp(act(x + b) * gain, -clamp, clamp)
// Gradient: dz = dy * act'(x + b) * gain * [|act(x + b) * gain| <= clamp]
// (dz is the gradient of both x and, summed over the other axes, b). clamp < 0 = no clamp.
//
// The tensors are processed as flat arrays in their own memory order (any dense layout,
// channels_last included); the bias index of flat element i is (i / stride[dim]) % size[dim].
// Arithmetic runs in float for half/bfloat16/float and in double for double.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>

namespace next3d {
namespace {

// Activation codes; keep in sync with ACTIVATIONS in bias_act.py.
enum Activation : int {
    kLinear = 0, kRelu = 1, kLrelu = 2, kTanh = 3, kSigmoid = 4, kElu = 5, kSelu = 6, kSoftplus = 7, kSwish = 8,
};

constexpr double kSeluScale = 1.0507009873554804934193349852946;
constexpr double kSeluAlpha = 1.6732632423543772848170429916717;
constexpr double kSoftplusThreshold = 20.0;     // Above this, softplus(z) = z (as torch.nn.functional.softplus).

__device__ __forceinline__ float math_exp(float v) { return expf(v); }
__device__ __forceinline__ double math_exp(double v) { return exp(v); }
__device__ __forceinline__ float math_expm1(float v) { return expm1f(v); }
__device__ __forceinline__ double math_expm1(double v) { return expm1(v); }
__device__ __forceinline__ float math_log1p(float v) { return log1pf(v); }
__device__ __forceinline__ double math_log1p(double v) { return log1p(v); }
__device__ __forceinline__ float math_tanh(float v) { return tanhf(v); }
__device__ __forceinline__ double math_tanh(double v) { return tanh(v); }

template <typename T>
__device__ __forceinline__ T sigmoid(T z) {
    return T(1) / (T(1) + math_exp(-z));
}

template <typename T>
__device__ __forceinline__ T activate(T z, int act, T alpha) {
    switch (act) {
        case kRelu:     return z > T(0) ? z : T(0);
        case kLrelu:    return z > T(0) ? z : z * alpha;
        case kTanh:     return math_tanh(z);
        case kSigmoid:  return sigmoid(z);
        case kElu:      return z > T(0) ? z : alpha * math_expm1(z);
        case kSelu:     return z > T(0) ? T(kSeluScale) * z : T(kSeluScale * kSeluAlpha) * math_expm1(z);
        case kSoftplus: return z > T(kSoftplusThreshold) ? z : math_log1p(math_exp(z));
        case kSwish:    return z * sigmoid(z);
        default:        return z;
    }
}

// First derivative; at the kinks it takes the same side as PyTorch's autograd formulas.
template <typename T>
__device__ __forceinline__ T activate_grad(T z, int act, T alpha) {
    switch (act) {
        case kRelu:     return z > T(0) ? T(1) : T(0);
        case kLrelu:    return z > T(0) ? T(1) : alpha;
        case kTanh:     { T t = math_tanh(z); return T(1) - t * t; }
        case kSigmoid:  { T s = sigmoid(z); return s * (T(1) - s); }
        case kElu:      return z > T(0) ? T(1) : alpha * math_exp(z);
        case kSelu:     return z > T(0) ? T(kSeluScale) : T(kSeluScale * kSeluAlpha) * math_exp(z);
        case kSoftplus: return z > T(kSoftplusThreshold) ? T(1) : sigmoid(z);
        case kSwish:    { T s = sigmoid(z); return s + z * s * (T(1) - s); }
        default:        return T(1);
    }
}

// One thread per element, grid-stride loop. kGrad selects forward (y) or gradient (dz).
template <typename scalar_t, typename index_t, bool kGrad>
__global__ void bias_act_kernel(
    scalar_t* __restrict__ out,
    const scalar_t* __restrict__ x,
    const scalar_t* __restrict__ b,         // nullptr = no bias
    const scalar_t* __restrict__ dy,        // gradient mode only
    index_t numel,
    index_t bias_stride,
    index_t bias_size,
    int act,
    at::opmath_type<scalar_t> alpha,
    at::opmath_type<scalar_t> gain,
    at::opmath_type<scalar_t> clamp)
{
    using T = at::opmath_type<scalar_t>;
    const index_t step = static_cast<index_t>(blockDim.x) * gridDim.x;
    for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += step) {
        T z = static_cast<T>(x[i]);
        if (b != nullptr)
            z += static_cast<T>(b[(i / bias_stride) % bias_size]);
        T y = activate(z, act, alpha) * gain;
        if (!kGrad) {
            if (clamp >= T(0))
                y = y > clamp ? clamp : (y < -clamp ? -clamp : y);
            out[i] = static_cast<scalar_t>(y);
        } else {
            T g = static_cast<T>(dy[i]) * activate_grad(z, act, alpha) * gain;
            if (clamp >= T(0) && !(y <= clamp && y >= -clamp))
                g = T(0);
            out[i] = static_cast<scalar_t>(g);
        }
    }
}

template <typename scalar_t, typename index_t, bool kGrad>
void launch(at::Tensor& out, const at::Tensor& x, const at::Tensor* b, const at::Tensor* dy, int64_t dim, int act, double alpha, double gain, double clamp) {
    using T = at::opmath_type<scalar_t>;
    const int64_t numel = x.numel();
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((numel + threads - 1) / threads, int64_t(1) << 20);
    bias_act_kernel<scalar_t, index_t, kGrad><<<static_cast<unsigned int>(blocks), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        out.data_ptr<scalar_t>(),
        x.data_ptr<scalar_t>(),
        b != nullptr ? b->data_ptr<scalar_t>() : nullptr,
        dy != nullptr ? dy->data_ptr<scalar_t>() : nullptr,
        static_cast<index_t>(numel),
        static_cast<index_t>(std::max<int64_t>(out.stride(dim), 1)),
        static_cast<index_t>(std::max<int64_t>(x.size(dim), 1)),
        act, static_cast<T>(alpha), static_cast<T>(gain), static_cast<T>(clamp));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Forward (dy empty) or gradient (dy given). Returns a tensor with x's shape, dtype and strides
// (those of torch.empty_like(x), which is what the fake kernel in bias_act.py returns).
at::Tensor bias_act_cuda(
    const at::Tensor& x,
    const std::optional<at::Tensor>& b,
    const std::optional<at::Tensor>& dy,
    int64_t dim,
    int64_t act,
    double alpha,
    double gain,
    double clamp)
{
    TORCH_CHECK(x.is_cuda(), "bias_act: x must be a CUDA tensor");
    TORCH_CHECK(dim >= 0 && dim < x.dim(), "bias_act: dim out of range");
    TORCH_CHECK(act >= kLinear && act <= kSwish, "bias_act: unknown activation code ", act);
    const c10::cuda::CUDAGuard guard(x.device());

    at::Tensor out = at::empty_like(x);
    // empty_like gives a dense layout; bring every operand into that layout (strides of size-1
    // dimensions do not matter: no index ever steps along them).
    auto like_out = [&](const at::Tensor& t) {
        for (int64_t d = 0; d < t.dim(); ++d)
            if (t.size(d) > 1 && t.stride(d) != out.stride(d))
                return at::empty_like(out).copy_(t);
        return t;
    };
    at::Tensor bb, dd;
    if (b.has_value()) {
        TORCH_CHECK(b->dim() == 1 && b->size(0) == x.size(dim), "bias_act: b must have shape [x.shape[dim]]");
        TORCH_CHECK(b->device() == x.device() && b->scalar_type() == x.scalar_type(), "bias_act: b must match x's device and dtype");
        bb = b->contiguous();
    }
    if (dy.has_value()) {
        TORCH_CHECK(dy->sizes() == x.sizes(), "bias_act: dy must have x's shape");
        TORCH_CHECK(dy->device() == x.device() && dy->scalar_type() == x.scalar_type(), "bias_act: dy must match x's device and dtype");
        dd = like_out(*dy);
    }
    if (x.numel() == 0)
        return out;
    const at::Tensor xx = like_out(x);
    const at::Tensor* bp = b.has_value() ? &bb : nullptr;
    const at::Tensor* dp = dy.has_value() ? &dd : nullptr;
    const bool small = x.numel() < (int64_t(1) << 30);     // 32-bit indices: i + grid stride (<= 2^28) stays below 2^31.

    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bias_act_cuda", [&] {
        if (dp == nullptr) {
            if (small) launch<scalar_t, int32_t, false>(out, xx, bp, dp, dim, static_cast<int>(act), alpha, gain, clamp);
            else       launch<scalar_t, int64_t, false>(out, xx, bp, dp, dim, static_cast<int>(act), alpha, gain, clamp);
        } else {
            if (small) launch<scalar_t, int32_t, true>(out, xx, bp, dp, dim, static_cast<int>(act), alpha, gain, clamp);
            else       launch<scalar_t, int64_t, true>(out, xx, bp, dp, dim, static_cast<int>(act), alpha, gain, clamp);
        }
    });
    return out;
}

}  // namespace next3d
