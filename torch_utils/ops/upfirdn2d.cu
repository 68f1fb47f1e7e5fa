// CUDA kernel of torch_utils/ops/upfirdn2d.py: zero-insert upsample, pad/crop, 2-D FIR
// correlation, decimate, in one direct pass.
//
//   out[n, c, oy, ox] = sum_{ky, kx} w[ky, kx] * u[n, c, oy * downy + ky - pady0, ox * downx + kx - padx0]
//
// where u is the zero-inserted input (u[j] = x[j / up] when j % up == 0 and j < in * up, else 0)
// and w the correlation kernel: the filter read flipped for a true convolution, the gain applied
// to the sum (so the filter is used as given, with no per-call preparation). Each thread computes one output sample and visits only the taps
// that land on a nonzero sample of u (every up-th tap), so upsampling costs no wasted work.
// Any input strides are read; the output is NCHW-contiguous or channels_last like the input,
// and the flat thread index walks the output in its memory order so writes are coalesced.
// Accumulation in float for half/bfloat16/float, in double for double.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace next3d {
namespace {

struct Params {
    int batch, channels, in_h, in_w, out_h, out_w;
    int taps_h, taps_w, upx, upy, downx, downy, padx0, pady0;
    bool flip_filter;       // false: read the filter flipped (true convolution); true: as is (correlation)
    double gain;
    int64_t in_stride_n, in_stride_c, in_stride_h, in_stride_w;
    int64_t out_stride_n, out_stride_c, out_stride_h, out_stride_w;
    bool channels_last;     // Output memory order: channel fastest (true) or x fastest (false).
};

__device__ __forceinline__ int positive_mod(int a, int m) {
    const int r = a % m;
    return r < 0 ? r + m : r;
}

template <typename scalar_t, typename index_t>
__global__ void upfirdn2d_kernel(
    scalar_t* __restrict__ out,
    const scalar_t* __restrict__ x,
    const at::opmath_type<scalar_t>* __restrict__ f,     // [taps_h, taps_w], the filter as given
    Params p,
    index_t numel)
{
    using T = at::opmath_type<scalar_t>;
    const index_t step = static_cast<index_t>(blockDim.x) * gridDim.x;
    for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += step) {
        int n, c, oy, ox;
        index_t t = i;
        if (p.channels_last) {
            c = static_cast<int>(t % p.channels); t /= p.channels;
            ox = static_cast<int>(t % p.out_w); t /= p.out_w;
            oy = static_cast<int>(t % p.out_h); t /= p.out_h;
            n = static_cast<int>(t);
        } else {
            ox = static_cast<int>(t % p.out_w); t /= p.out_w;
            oy = static_cast<int>(t % p.out_h); t /= p.out_h;
            c = static_cast<int>(t % p.channels); t /= p.channels;
            n = static_cast<int>(t);
        }

        // Taps ky with u-row j = base_y + ky inside [0, in_h * upy) and j % upy == 0.
        const int base_y = oy * p.downy - p.pady0;
        const int lo_y = max(0, -base_y);
        const int ky_begin = lo_y + positive_mod(-base_y - lo_y, p.upy);
        const int ky_end = min(p.taps_h, p.in_h * p.upy - base_y);
        const int base_x = ox * p.downx - p.padx0;
        const int lo_x = max(0, -base_x);
        const int kx_begin = lo_x + positive_mod(-base_x - lo_x, p.upx);
        const int kx_end = min(p.taps_w, p.in_w * p.upx - base_x);

        const scalar_t* xp = x + n * p.in_stride_n + c * p.in_stride_c;
        T acc = T(0);
        for (int ky = ky_begin; ky < ky_end; ky += p.upy) {
            const int iy = (base_y + ky) / p.upy;
            const scalar_t* row = xp + iy * p.in_stride_h;
            const T* frow = f + (p.flip_filter ? ky : p.taps_h - 1 - ky) * p.taps_w;
            for (int kx = kx_begin; kx < kx_end; kx += p.upx) {
                const int ix = (base_x + kx) / p.upx;
                acc += frow[p.flip_filter ? kx : p.taps_w - 1 - kx] * static_cast<T>(row[ix * p.in_stride_w]);
            }
        }
        out[n * p.out_stride_n + c * p.out_stride_c + oy * p.out_stride_h + ox * p.out_stride_w] = static_cast<scalar_t>(acc * static_cast<T>(p.gain));
    }
}

}  // namespace

// x [N, C, H, W] (any strides, CUDA), f [taps_h, taps_w] float32 filter as given to
// upfirdn2d.py (not flipped, no gain). Returns [N, C, out_h, out_w] in x's dtype, channels_last
// when x is channels_last and not contiguous, else contiguous (as the fake kernel in upfirdn2d.py).
at::Tensor upfirdn2d_cuda(
    const at::Tensor& x,
    const at::Tensor& f,
    int64_t upx, int64_t upy,
    int64_t downx, int64_t downy,
    int64_t padx0, int64_t padx1, int64_t pady0, int64_t pady1,
    bool flip_filter,
    double gain)
{
    TORCH_CHECK(x.is_cuda() && x.dim() == 4, "upfirdn2d: x must be a 4-D CUDA tensor");
    TORCH_CHECK(f.dim() == 2 && f.scalar_type() == at::kFloat && f.device() == x.device(), "upfirdn2d: f must be a 2-D float32 tensor on x's device");
    TORCH_CHECK(upx >= 1 && upy >= 1 && downx >= 1 && downy >= 1, "upfirdn2d: scaling factors must be >= 1");
    const c10::cuda::CUDAGuard guard(x.device());

    const int64_t batch = x.size(0), channels = x.size(1), in_h = x.size(2), in_w = x.size(3);
    const int64_t taps_h = f.size(0), taps_w = f.size(1);
    // Every coordinate the kernel forms in 32-bit ints (u-rows, output rows x down, taps, filter
    // index, padding) stays below 2^30 in magnitude, so sums of two stay below 2^31. The single
    // values first: then no product or sum below can overflow 64 bits.
    const int64_t limit = int64_t(1) << 30;
    for (const int64_t v : {in_h, in_w, taps_h, taps_w, upx, upy, downx, downy})
        TORCH_CHECK(v < limit, "upfirdn2d: sizes, taps or factors too large for 32-bit coordinates");
    for (const int64_t v : {padx0, padx1, pady0, pady1})
        TORCH_CHECK(v > -limit && v < limit, "upfirdn2d: padding too large for 32-bit coordinates");
    TORCH_CHECK(in_h * upy + pady0 + pady1 - taps_h >= 0 && in_w * upx + padx0 + padx1 - taps_w >= 0, "upfirdn2d: empty output");
    const int64_t out_h = (in_h * upy + pady0 + pady1 - taps_h) / downy + 1;
    const int64_t out_w = (in_w * upx + padx0 + padx1 - taps_w) / downx + 1;
    for (const int64_t v : {in_h * upy, in_w * upx, out_h * downy, out_w * downx, taps_h * taps_w})
        TORCH_CHECK(v < limit, "upfirdn2d: sizes, taps or factors too large for 32-bit coordinates");
    TORCH_CHECK(batch * channels < (int64_t(1) << 31), "upfirdn2d: batch x channels too large for 32-bit coordinates");

    const bool channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
    at::Tensor out = at::empty({batch, channels, out_h, out_w},
                               x.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
    if (out.numel() == 0)
        return out;

    Params p;
    p.batch = static_cast<int>(batch); p.channels = static_cast<int>(channels);
    p.in_h = static_cast<int>(in_h); p.in_w = static_cast<int>(in_w);
    p.out_h = static_cast<int>(out_h); p.out_w = static_cast<int>(out_w);
    p.taps_h = static_cast<int>(taps_h); p.taps_w = static_cast<int>(taps_w);
    p.upx = static_cast<int>(upx); p.upy = static_cast<int>(upy);
    p.downx = static_cast<int>(downx); p.downy = static_cast<int>(downy);
    p.padx0 = static_cast<int>(padx0); p.pady0 = static_cast<int>(pady0);
    p.in_stride_n = x.stride(0); p.in_stride_c = x.stride(1); p.in_stride_h = x.stride(2); p.in_stride_w = x.stride(3);
    p.out_stride_n = out.stride(0); p.out_stride_c = out.stride(1); p.out_stride_h = out.stride(2); p.out_stride_w = out.stride(3);
    p.channels_last = channels_last;
    p.flip_filter = flip_filter;
    p.gain = gain;

    const int64_t numel = out.numel();
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((numel + threads - 1) / threads, int64_t(1) << 20);
    const bool small = numel < (int64_t(1) << 30);     // 32-bit flat indices: i + grid stride (<= 2^28) stays below 2^31.

    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "upfirdn2d_cuda", [&] {
        using T = at::opmath_type<scalar_t>;
        // The filter in the accumulation type: no copy for float32 filters with float/half/bfloat16 x.
        const at::Tensor w = f.to(c10::CppTypeToScalarType<T>::value).contiguous();
        const auto stream = c10::cuda::getCurrentCUDAStream();
        if (small)
            upfirdn2d_kernel<scalar_t, int32_t><<<static_cast<unsigned int>(blocks), threads, 0, stream>>>(
                out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w.data_ptr<T>(), p, static_cast<int32_t>(numel));
        else
            upfirdn2d_kernel<scalar_t, int64_t><<<static_cast<unsigned int>(blocks), threads, 0, stream>>>(
                out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w.data_ptr<T>(), p, numel);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return out;
}

}  // namespace next3d
