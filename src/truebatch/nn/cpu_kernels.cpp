// truebatch's CPU kernels (built on first use by truebatch/nn/cpu_kernels.py): ghost
// BatchNorm, and the keep decisions of split-invariant dropout (at the end).
//
// Ghost BatchNorm over a block of `chunks` full ghost batches. For every ghost
// batch j and channel c, over the n values of (j, c), with S the sum over them:
//
//     mean = S(x) / n,   var = S((x - mean)^2) / n,   rstd = 1 / sqrt(var + eps)
//     y    = (x - mean) * rstd * weight + bias
//     dx   = k * dy + b * (x - mean) + a,   k = rstd * weight,
//            a = -k * S(dy) / n,   b = -k * rstd * S(dy * x_hat) / n
//
// with x_hat = (x - mean) * rstd; the weight and bias gradients are S(dy * x_hat)
// and S(dy) summed over the block's ghost batches, and the running statistics
// receive sum_j w_j mean_j and sum_j w_j var_j * n / (n - 1) for the caller's
// running-average weights w_j. Sums over a ghost batch are taken in the input's
// op-math type (float for float/bfloat16/float16, double for double), in two
// passes (centred), as BatchNorm's own kernel; sums over ghost batches in double.
//
// Memory traffic is BatchNorm's: each task reads its ghost batch's values while
// they are in cache, the forward writes only y, and small ghost batches' mean
// and rstd are recomputed by the backward rather than stored (for ghost batches
// of two samples they would be as large as the input).
//
// Two memory layouts, both dense along the block:
// - channels inner: every ghost batch is `rows` rows of C contiguous channels
//   ((N, C) inputs, and channels-last ones: a row per sample and position);
//   a task is (ghost batch, tile of channels);
// - channels outer: every sample is C runs of L contiguous values (contiguous
//   (N, C, L...) inputs); a task is (ghost batch, channel).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kTile = 256;          // channels per task, channels-inner layout
constexpr int64_t kTaskValues = 16384;  // values a run of tasks should at least touch
constexpr int64_t kSaveFrom = 8;        // ghost batches of >= this many values per channel
                                        // save mean and rstd; smaller ones recompute them

struct Block {
  int64_t chunks;    // ghost batches
  int64_t channels;  // C
  int64_t n;         // values per (ghost batch, channel)
  bool inner;        // channels inner (rows of C) or outer (runs of L)
  int64_t rows;      // channels inner: rows per ghost batch
  int64_t samples;   // channels outer: samples per ghost batch
  int64_t run;       // channels outer: L, contiguous values per (sample, channel)

  int64_t tiles() const { return inner ? (channels + kTile - 1) / kTile : channels; }
  int64_t tasks() const { return chunks * tiles(); }
  int64_t grain() const {
    const int64_t per_task = inner ? rows * std::min(channels, kTile) : n;
    return std::max<int64_t>(1, kTaskValues / std::max<int64_t>(1, per_task));
  }
};

Block block_of(const at::Tensor& x, int64_t chunks, bool channels_last) {
  TORCH_CHECK(chunks > 0 && x.dim() >= 2 && x.size(0) % chunks == 0 && x.numel() > 0,
              "ghost batch norm kernel: a block of ", chunks, " ghost batches got shape ",
              x.sizes());
  Block b;
  b.chunks = chunks;
  b.channels = x.size(1);
  b.samples = x.size(0) / chunks;
  b.run = x.numel() / (x.size(0) * b.channels);
  b.n = b.samples * b.run;
  b.inner = channels_last || b.run == 1;
  b.rows = b.inner ? b.n : 0;
  const auto format = x.dim() == 4   ? at::MemoryFormat::ChannelsLast
                      : x.dim() == 5 ? at::MemoryFormat::ChannelsLast3d
                                     : at::MemoryFormat::Contiguous;
  TORCH_CHECK(channels_last ? x.is_contiguous(format) : x.is_contiguous(),
              "ghost batch norm kernel: the input must be dense in its layout");
  return b;
}

void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes() && t.strides() == x.strides() &&
                  t.scalar_type() == x.scalar_type(),
              "ghost batch norm kernel: `", name,
              "` must have the input's shape, strides and dtype");
}

// A per-channel parameter as op-math values (`absent` where there is none).
template <typename acc_t>
std::vector<acc_t> per_channel(const c10::optional<at::Tensor>& p, int64_t channels,
                               acc_t absent) {
  std::vector<acc_t> out(channels, absent);
  if (p.has_value() && p->defined()) {
    const at::Tensor values = p->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    std::copy_n(values.data_ptr<acc_t>(), channels, out.begin());
  }
  return out;
}

// Sums over ghost batches: one row of `count` double values per thread, added in
// thread order at the end (deterministic for a given number of threads).
class ThreadSums {
 public:
  explicit ThreadSums(int64_t count)
      : count_(count), data_(static_cast<size_t>(at::get_num_threads() * count), 0.0) {}
  double* mine() {
    const int64_t thread = at::get_thread_num();
    TORCH_INTERNAL_ASSERT(count_ == 0 || (thread + 1) * count_ <= static_cast<int64_t>(data_.size()));
    return data_.data() + thread * count_;
  }
  at::Tensor total(int64_t offset, int64_t length) const {
    at::Tensor out = at::empty({length}, at::kDouble);
    double* o = out.data_ptr<double>();
    std::fill_n(o, length, 0.0);
    for (size_t t = 0; t < data_.size(); t += count_) {
      for (int64_t i = 0; i < length; ++i) o[i] += data_[t + offset + i];
    }
    return out;
  }

 private:
  int64_t count_;
  std::vector<double> data_;
};

// Loads and stores of one element in op-math. bfloat16 goes through its bits (a
// shift; stores round to nearest even, as c10::BFloat16 does), which vectorizes.
template <typename scalar_t>
struct Io {
  using raw = scalar_t;
  using acc = at::opmath_type<scalar_t>;
  static inline acc load(raw v) { return static_cast<acc>(v); }
  static inline raw store(acc v) { return static_cast<raw>(v); }
};

template <>
struct Io<c10::BFloat16> {
  using raw = uint16_t;
  using acc = float;
  static inline float load(uint16_t v) {
    const uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  static inline uint16_t store(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    const uint16_t rounded = static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
    return f != f ? static_cast<uint16_t>(0x7FC0) : rounded;  // a select, not a branch
  }
};

// The column loops: `rows` rows of `width` contiguous columns, `stride` apart.
// Per-column arrays are op-math; restrict lets the loops over columns vectorize.

template <typename io, typename acc = typename io::acc>
void column_sums(const typename io::raw* __restrict__ x, int64_t rows, int64_t stride,
                 int64_t width, acc* __restrict__ sum) {
  for (int64_t r = 0; r < rows; ++r, x += stride) {
    for (int64_t k = 0; k < width; ++k) sum[k] += io::load(x[k]);
  }
}

template <typename io, typename acc = typename io::acc>
void column_squares(const typename io::raw* __restrict__ x, int64_t rows, int64_t stride,
                    int64_t width, const acc* __restrict__ mean, acc* __restrict__ squares) {
  for (int64_t r = 0; r < rows; ++r, x += stride) {
    for (int64_t k = 0; k < width; ++k) {
      const acc d = io::load(x[k]) - mean[k];
      squares[k] += d * d;
    }
  }
}

template <typename io, typename acc = typename io::acc>
void column_normalize(const typename io::raw* __restrict__ x, typename io::raw* __restrict__ y,
                      int64_t rows, int64_t stride, int64_t width, const acc* __restrict__ mean,
                      const acc* __restrict__ scale, const acc* __restrict__ shift) {
  for (int64_t r = 0; r < rows; ++r, x += stride, y += stride) {
    for (int64_t k = 0; k < width; ++k) {
      y[k] = io::store((io::load(x[k]) - mean[k]) * scale[k] + shift[k]);
    }
  }
}

template <typename io, typename acc = typename io::acc>
void column_gradient_sums(const typename io::raw* __restrict__ x,
                          const typename io::raw* __restrict__ dy, int64_t rows, int64_t stride,
                          int64_t width, const acc* __restrict__ mean, acc* __restrict__ sum_dy,
                          acc* __restrict__ sum_dy_d) {
  for (int64_t r = 0; r < rows; ++r, x += stride, dy += stride) {
    for (int64_t k = 0; k < width; ++k) {
      const acc g = io::load(dy[k]);
      sum_dy[k] += g;
      sum_dy_d[k] += g * (io::load(x[k]) - mean[k]);
    }
  }
}

template <typename io, typename acc = typename io::acc>
void column_input_gradient(const typename io::raw* __restrict__ x,
                           const typename io::raw* __restrict__ dy,
                           typename io::raw* __restrict__ dx, int64_t rows, int64_t stride,
                           int64_t width, const acc* __restrict__ mean, const acc* __restrict__ k_,
                           const acc* __restrict__ a, const acc* __restrict__ b) {
  for (int64_t r = 0; r < rows; ++r, x += stride, dy += stride, dx += stride) {
    for (int64_t k = 0; k < width; ++k) {
      dx[k] = io::store(k_[k] * io::load(dy[k]) + b[k] * (io::load(x[k]) - mean[k]) + a[k]);
    }
  }
}

// A task is ghost batch j and, for channels inner, a tile of `width` channels from
// `first` (columns: channels; rows: the ghost batch's rows); for channels outer, one
// channel `first` (columns: positions of a run, tiled by kTile; rows: samples).
struct Task {
  int64_t j, first, width;
  int64_t offset;  // of the first value, in elements
};

inline Task task_of(const Block& b, int64_t task) {
  const int64_t j = task / b.tiles();
  if (b.inner) {
    const int64_t first = (task % b.tiles()) * kTile;
    return {j, first, std::min(kTile, b.channels - first), j * b.rows * b.channels + first};
  }
  const int64_t c = task % b.channels;
  return {j, c, 1, j * b.samples * b.channels * b.run + c * b.run};
}

// Runs f(offset, rows, stride, width, column) over the task's column blocks: one for
// channels inner; the kTile-wide pieces of the run for channels outer.
template <typename F>
inline void for_columns(const Block& b, const Task& t, F f) {
  if (b.inner) {
    f(t.offset, b.rows, b.channels, t.width);
    return;
  }
  for (int64_t l = 0; l < b.run; l += kTile) {
    f(t.offset + l, b.samples, b.channels * b.run, std::min(kTile, b.run - l));
  }
}

// Per-column values of a task: the channel's own for channels inner, the one channel's
// broadcast for channels outer (whose columns are positions of one channel).
template <typename acc>
struct Columns {
  acc v[kTile];
  // Sum over a task's columns into v[0] (channels outer), nothing for channels inner.
  void fold(const Block& b, int64_t width) {
    if (b.inner) return;
    constexpr int64_t lanes = 8;  // independent sums: a dependency chain would be latency-bound
    acc lane[lanes] = {};
    int64_t k = 0;
    for (; k + lanes <= width; k += lanes) {
      for (int64_t l = 0; l < lanes; ++l) lane[l] += v[k + l];
    }
    acc total = 0;
    for (; k < width; ++k) total += v[k];
    for (int64_t l = 0; l < lanes; ++l) total += lane[l];
    v[0] = total;
  }
  void broadcast(const Block& b) {
    if (!b.inner) std::fill_n(v + 1, std::min(kTile, b.run) - 1, v[0]);
  }
  void zero(int64_t width = kTile) { std::fill_n(v, width, acc(0)); }
};

// The task's mean and rstd per channel (broadcast over the columns) and squared
// deviations: two passes, the second centred.
template <typename io, typename acc = typename io::acc>
void task_statistics(const Block& b, const Task& t, const typename io::raw* X, double eps,
                     Columns<acc>& mean, Columns<acc>& rstd, Columns<acc>& squares) {
  const acc inverse_n = acc(1) / static_cast<acc>(b.n);
  const int64_t channels = b.inner ? t.width : 1;
  mean.zero(channels);
  for_columns(b, t, [&](int64_t offset, int64_t rows, int64_t stride, int64_t width) {
    if (b.inner) {
      column_sums<io>(X + offset, rows, stride, width, mean.v);
    } else {
      Columns<acc> part;
      part.zero(width);
      column_sums<io>(X + offset, rows, stride, width, part.v);
      part.fold(b, width);
      mean.v[0] += part.v[0];
    }
  });
  for (int64_t k = 0; k < channels; ++k) mean.v[k] *= inverse_n;
  mean.broadcast(b);
  squares.zero(channels);
  for_columns(b, t, [&](int64_t offset, int64_t rows, int64_t stride, int64_t width) {
    if (b.inner) {
      column_squares<io>(X + offset, rows, stride, width, mean.v, squares.v);
    } else {
      Columns<acc> part;
      part.zero(width);
      column_squares<io>(X + offset, rows, stride, width, mean.v, part.v);
      part.fold(b, width);
      squares.v[0] += part.v[0];
    }
  });
  for (int64_t k = 0; k < channels; ++k) {
    rstd.v[k] = acc(1) / std::sqrt(squares.v[k] * inverse_n + static_cast<acc>(eps));
  }
  rstd.broadcast(b);
}

// Ghost batches of two rows (channels inner), in closed form on the two rows x0, x1:
// x0 - mean = h = (x0 - x1) / 2 = -(x1 - mean), var = h^2, so x_hat = +-t with
// t = h * rstd; y = bias +- t * weight. With D = dy0 - dy1: S(dy * x_hat) = t * D and,
// as 1 - t^2 = eps * rstd^2, dx0 = -dx1 = D * eps * rstd^3 * weight / 2 (no
// cancellation). One pass each way, and no sums.
template <typename io, typename acc = typename io::acc>
void pair_forward(const typename io::raw* __restrict__ x0, const typename io::raw* __restrict__ x1,
                  typename io::raw* __restrict__ y0, typename io::raw* __restrict__ y1,
                  int64_t width, const acc* __restrict__ w, const acc* __restrict__ bias,
                  acc eps, acc* __restrict__ mean, acc* __restrict__ unbiased_var) {
  for (int64_t k = 0; k < width; ++k) {
    const acc a = io::load(x0[k]), b = io::load(x1[k]);
    const acc h = (a - b) * acc(0.5);
    const acc square = h * h;
    const acc scaled = h / std::sqrt(square + eps) * w[k];
    mean[k] = (a + b) * acc(0.5);
    unbiased_var[k] = square * acc(2);
    y0[k] = io::store(bias[k] + scaled);
    y1[k] = io::store(bias[k] - scaled);
  }
}

template <typename io, bool kInputGradient, typename acc = typename io::acc>
void pair_backward(const typename io::raw* __restrict__ x0, const typename io::raw* __restrict__ x1,
                   const typename io::raw* __restrict__ dy0,
                   const typename io::raw* __restrict__ dy1, typename io::raw* __restrict__ dx0,
                   typename io::raw* __restrict__ dx1, int64_t width, const acc* __restrict__ w,
                   acc eps, acc* __restrict__ sum_dy, acc* __restrict__ sum_dy_xhat) {
  for (int64_t k = 0; k < width; ++k) {
    const acc h = (io::load(x0[k]) - io::load(x1[k])) * acc(0.5);
    const acc rstd = acc(1) / std::sqrt(h * h + eps);
    const acc g0 = io::load(dy0[k]), g1 = io::load(dy1[k]);
    const acc difference = g0 - g1;
    sum_dy[k] = g0 + g1;
    sum_dy_xhat[k] = h * rstd * difference;
    if constexpr (kInputGradient) {
      const acc g = difference * (rstd * rstd * rstd * (acc(0.5) * eps) * w[k]);
      dx0[k] = io::store(g);
      dx1[k] = io::store(-g);
    }
  }
}

template <typename scalar_t>
void forward_kernel(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                    const c10::optional<at::Tensor>& bias, const Block& b, double eps,
                    const double* running, at::Tensor& out, at::Tensor& save_mean,
                    at::Tensor& save_rstd, ThreadSums& sums) {
  using io = Io<scalar_t>;
  using acc = typename io::acc;
  using raw = typename io::raw;
  const int64_t C = b.channels;
  const std::vector<acc> w = per_channel<acc>(weight, C, 1);
  const std::vector<acc> bs = per_channel<acc>(bias, C, 0);
  const raw* X = reinterpret_cast<const raw*>(x.const_data_ptr<scalar_t>());
  raw* Y = reinterpret_cast<raw*>(out.data_ptr<scalar_t>());
  acc* M = save_mean.defined() ? save_mean.data_ptr<acc>() : nullptr;
  acc* R = save_rstd.defined() ? save_rstd.data_ptr<acc>() : nullptr;
  const double unbiased = b.n > 1 ? 1.0 / static_cast<double>(b.n - 1) : NAN;
  at::parallel_for(0, b.tasks(), b.grain(), [&](int64_t begin, int64_t end) {
    Columns<acc> mean, rstd, squares, scale, shift;
    double* running_sums = running ? sums.mine() : nullptr;
    for (int64_t task = begin; task < end; ++task) {
      const Task t = task_of(b, task);
      const int64_t channels = b.inner ? t.width : 1;
      if (b.inner && b.rows == 2) {
        const raw* x0 = X + t.offset;
        raw* y0 = Y + t.offset;
        pair_forward<io>(x0, x0 + C, y0, y0 + C, t.width, w.data() + t.first,
                         bs.data() + t.first, static_cast<acc>(eps), mean.v, squares.v);
        if (running_sums) {
          const double wj = running[t.j];
          for (int64_t k = 0; k < channels; ++k) {
            running_sums[t.first + k] += wj * static_cast<double>(mean.v[k]);
            running_sums[C + t.first + k] += wj * static_cast<double>(squares.v[k]);
          }
        }
        continue;
      }
      task_statistics<io>(b, t, X, eps, mean, rstd, squares);
      for (int64_t k = 0; k < channels; ++k) {
        scale.v[k] = rstd.v[k] * w[t.first + k];
        shift.v[k] = bs[t.first + k];
      }
      scale.broadcast(b);
      shift.broadcast(b);
      if (M) {
        std::copy_n(mean.v, channels, M + t.j * C + t.first);
        std::copy_n(rstd.v, channels, R + t.j * C + t.first);
      }
      if (running_sums) {
        const double wj = running[t.j];
        for (int64_t k = 0; k < channels; ++k) {
          running_sums[t.first + k] += wj * static_cast<double>(mean.v[k]);
          running_sums[C + t.first + k] += wj * static_cast<double>(squares.v[k]) * unbiased;
        }
      }
      for_columns(b, t, [&](int64_t offset, int64_t rows, int64_t stride, int64_t width) {
        column_normalize<io>(X + offset, Y + offset, rows, stride, width, mean.v, scale.v,
                             shift.v);
      });
    }
  });
}

template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& x,
                     const c10::optional<at::Tensor>& weight, const at::Tensor& save_mean,
                     const at::Tensor& save_rstd, const Block& b, double eps, bool input_grad,
                     at::Tensor& grad_x, ThreadSums& sums) {
  using io = Io<scalar_t>;
  using acc = typename io::acc;
  using raw = typename io::raw;
  const int64_t C = b.channels;
  const acc inverse_n = acc(1) / static_cast<acc>(b.n);
  const std::vector<acc> w = per_channel<acc>(weight, C, 1);
  const raw* X = reinterpret_cast<const raw*>(x.const_data_ptr<scalar_t>());
  const raw* DY = reinterpret_cast<const raw*>(grad_out.const_data_ptr<scalar_t>());
  raw* DX = input_grad ? reinterpret_cast<raw*>(grad_x.data_ptr<scalar_t>()) : nullptr;
  const acc* M = save_mean.numel() ? save_mean.const_data_ptr<acc>() : nullptr;
  const acc* R = save_rstd.numel() ? save_rstd.const_data_ptr<acc>() : nullptr;
  at::parallel_for(0, b.tasks(), b.grain(), [&](int64_t begin, int64_t end) {
    Columns<acc> mean, rstd, squares, sum_dy, sum_dy_d, k_, a, bb;
    double* parameter_sums = sums.mine();
    for (int64_t task = begin; task < end; ++task) {
      const Task t = task_of(b, task);
      const int64_t channels = b.inner ? t.width : 1;
      if (b.inner && b.rows == 2) {
        const int64_t o = t.offset;
        if (DX) {
          pair_backward<io, true>(X + o, X + o + C, DY + o, DY + o + C, DX + o, DX + o + C,
                                  t.width, w.data() + t.first, static_cast<acc>(eps), sum_dy.v,
                                  sum_dy_d.v);
        } else {
          pair_backward<io, false>(X + o, X + o + C, DY + o, DY + o + C, nullptr, nullptr,
                                   t.width, w.data() + t.first, static_cast<acc>(eps), sum_dy.v,
                                   sum_dy_d.v);
        }
        for (int64_t k = 0; k < channels; ++k) {
          parameter_sums[t.first + k] += static_cast<double>(sum_dy_d.v[k]);
          parameter_sums[C + t.first + k] += static_cast<double>(sum_dy.v[k]);
        }
        continue;
      }
      if (M) {
        std::copy_n(M + t.j * C + t.first, channels, mean.v);
        std::copy_n(R + t.j * C + t.first, channels, rstd.v);
        mean.broadcast(b);
        rstd.broadcast(b);
      } else {
        task_statistics<io>(b, t, X, eps, mean, rstd, squares);
      }
      sum_dy.zero(channels);
      sum_dy_d.zero(channels);
      for_columns(b, t, [&](int64_t offset, int64_t rows, int64_t stride, int64_t width) {
        if (b.inner) {
          column_gradient_sums<io>(X + offset, DY + offset, rows, stride, width, mean.v,
                                   sum_dy.v, sum_dy_d.v);
        } else {
          Columns<acc> dy, dy_d;
          dy.zero(width);
          dy_d.zero(width);
          column_gradient_sums<io>(X + offset, DY + offset, rows, stride, width, mean.v, dy.v,
                                   dy_d.v);
          dy.fold(b, width);
          dy_d.fold(b, width);
          sum_dy.v[0] += dy.v[0];
          sum_dy_d.v[0] += dy_d.v[0];
        }
      });
      for (int64_t k = 0; k < channels; ++k) {
        const acc sum_dy_xhat = sum_dy_d.v[k] * rstd.v[k];
        k_.v[k] = rstd.v[k] * w[t.first + k];
        const acc minus_k_over_n = -k_.v[k] * inverse_n;
        a.v[k] = minus_k_over_n * sum_dy.v[k];
        bb.v[k] = minus_k_over_n * rstd.v[k] * sum_dy_xhat;
        parameter_sums[t.first + k] += static_cast<double>(sum_dy_xhat);
        parameter_sums[C + t.first + k] += static_cast<double>(sum_dy.v[k]);
      }
      if (!DX) continue;
      k_.broadcast(b);
      a.broadcast(b);
      bb.broadcast(b);
      for_columns(b, t, [&](int64_t offset, int64_t rows, int64_t stride, int64_t width) {
        column_input_gradient<io>(X + offset, DY + offset, DX + offset, rows, stride, width,
                                  mean.v, k_.v, a.v, bb.v);
      });
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> ghost_batch_norm_forward(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, int64_t chunks, double eps, bool channels_last,
    const c10::optional<at::Tensor>& running_weights, at::Tensor out) {
  const Block b = block_of(x, chunks, channels_last);
  check_like(out, x, "out");
  const bool running = running_weights.has_value() && running_weights->defined();
  at::Tensor weights;
  if (running) {
    weights = running_weights->to(at::kDouble).contiguous();
    TORCH_CHECK(weights.numel() == chunks, "ghost batch norm kernel: one running weight per "
                "ghost batch expected, got ", weights.numel());
  }
  const auto acc = at::toOpMathType(x.scalar_type());
  at::Tensor save_mean, save_rstd;
  if (b.n >= kSaveFrom) {
    save_mean = at::empty({chunks, b.channels}, x.options().dtype(acc));
    save_rstd = at::empty_like(save_mean);
  }
  ThreadSums sums(running ? 2 * b.channels : 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ghost_bn_fwd", [&] {
    forward_kernel<scalar_t>(x, weight, bias, b, eps,
                             running ? weights.const_data_ptr<double>() : nullptr, out,
                             save_mean, save_rstd, sums);
  });
  if (!save_mean.defined()) {  // recomputed by the backward
    save_mean = at::empty({0}, x.options().dtype(acc));
    save_rstd = at::empty({0}, x.options().dtype(acc));
  }
  const int64_t C = running ? b.channels : 0;
  return {save_mean, save_rstd, sums.total(0, C), sums.total(C, C)};
}

std::tuple<at::Tensor, at::Tensor> ghost_batch_norm_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const at::Tensor& save_mean, const at::Tensor& save_rstd, int64_t chunks, double eps,
    bool channels_last, bool input_grad, at::Tensor grad_x) {
  const Block b = block_of(x, chunks, channels_last);
  check_like(grad_out, x, "grad_out");
  if (input_grad) check_like(grad_x, x, "grad_x");
  const auto acc = at::toOpMathType(x.scalar_type());
  const int64_t saved = save_mean.numel() ? chunks * b.channels : 0;
  TORCH_CHECK(save_mean.scalar_type() == acc && save_rstd.scalar_type() == acc &&
                  save_mean.is_contiguous() && save_rstd.is_contiguous() &&
                  save_mean.numel() == saved && save_rstd.numel() == saved &&
                  (saved > 0) == (b.n >= kSaveFrom),
              "ghost batch norm kernel: the saved statistics are not the forward's");
  ThreadSums sums(2 * b.channels);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "ghost_bn_bwd", [&] {
    backward_kernel<scalar_t>(grad_out, x, weight, save_mean, save_rstd, b, eps, input_grad,
                              grad_x, sums);
  });
  // In the parameters' dtype (float64 sums), as autograd expects them.
  const auto dtype = weight.has_value() && weight->defined() ? weight->scalar_type() : acc;
  return {sums.total(0, b.channels).to(dtype), sums.total(b.channels, b.channels).to(dtype)};
}

// The whole call as one autograd node, for a batch of full ghost batches: the layer's
// common case, without the Python autograd.Function's fixed cost per call.
struct GhostBatchNormNode : public torch::autograd::Function<GhostBatchNormNode> {
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& x,
      const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
      int64_t chunks, double eps, bool channels_last,
      const c10::optional<at::Tensor>& running_weights) {
    at::Tensor out = at::empty_like(x);
    auto [save_mean, save_rstd, mean_update, var_update] = ghost_batch_norm_forward(
        x, weight, bias, chunks, eps, channels_last, running_weights, out);
    const bool has_weight = weight.has_value() && weight->defined();
    ctx->save_for_backward({x, has_weight ? *weight : at::Tensor(), save_mean, save_rstd});
    ctx->saved_data["chunks"] = chunks;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["channels_last"] = channels_last;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->mark_non_differentiable({mean_update, var_update});
    return {out, mean_update, var_update};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    // create_graph=True: these gradients would not be differentiable, so a gradient
    // penalty through the layer would silently lose its part. Refuse, as the Python
    // path's once_differentiable does.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "GhostBatchNorm got a backward with create_graph=True; it supports "
                "first-order gradients only (its gradient is not differentiable). Fix: "
                "compute the higher-order term (e.g. a gradient penalty) without the ghost "
                "layer in train mode, e.g. with the model in eval mode.");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const bool channels_last = ctx->saved_data["channels_last"].toBool();
    const auto format = !channels_last ? at::MemoryFormat::Contiguous
                        : x.dim() == 4 ? at::MemoryFormat::ChannelsLast
                                       : at::MemoryFormat::ChannelsLast3d;
    const bool input_grad = ctx->needs_input_grad(0);
    at::Tensor grad_x = input_grad ? at::empty_like(x) : at::Tensor();
    const c10::optional<at::Tensor> weight =
        saved[1].defined() ? c10::optional<at::Tensor>(saved[1]) : c10::nullopt;
    auto [grad_weight, grad_bias] = ghost_batch_norm_backward(
        grads[0].contiguous(format), x, weight, saved[2], saved[3],
        ctx->saved_data["chunks"].toInt(), ctx->saved_data["eps"].toDouble(), channels_last,
        input_grad, grad_x);
    return {grad_x, saved[1].defined() ? grad_weight : at::Tensor(),
            ctx->saved_data["has_bias"].toBool() ? grad_bias : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> ghost_batch_norm_autograd(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, int64_t chunks, double eps, bool channels_last,
    const c10::optional<at::Tensor>& running_weights) {
  auto outputs = GhostBatchNormNode::apply(x, weight, bias, chunks, eps, channels_last,
                                           running_weights);
  return {outputs[0], outputs[1], outputs[2]};
}

// Without autograd (inference mode): the forward alone.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ghost_batch_norm_inference(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& bias, int64_t chunks, double eps, bool channels_last,
    const c10::optional<at::Tensor>& running_weights) {
  at::Tensor out = at::empty_like(x);
  auto [save_mean, save_rstd, mean_update, var_update] = ghost_batch_norm_forward(
      x, weight, bias, chunks, eps, channels_last, running_weights, out);
  return {out, mean_update, var_update};
}

// BatchNorm's running statistics after a call's ghost batches, in place:
// r <- keep * r + update (in double, rounded once), and the count of batches.
void ghost_batch_norm_update(at::Tensor running_mean, at::Tensor running_var,
                             const c10::optional<at::Tensor>& num_batches_tracked, double keep,
                             const at::Tensor& mean_update, const at::Tensor& var_update,
                             int64_t chunks) {
  for (auto [running, update] : {std::pair{running_mean, mean_update},
                                 std::pair{running_var, var_update}}) {
    TORCH_CHECK(running.is_contiguous() && update.scalar_type() == at::kDouble &&
                    update.numel() == running.numel(),
                "ghost batch norm update: got running statistics of shape ", running.sizes(),
                " and an update of shape ", update.sizes());
    const at::Tensor u = update.contiguous();
    const double* add = u.const_data_ptr<double>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, running.scalar_type(),
                                    "ghost_bn_update", [&] {
      scalar_t* r = running.data_ptr<scalar_t>();
      for (int64_t c = 0; c < running.numel(); ++c) {
        r[c] = static_cast<scalar_t>(static_cast<double>(r[c]) * keep + add[c]);
      }
    });
  }
  if (num_batches_tracked.has_value() && num_batches_tracked->defined()) {
    num_batches_tracked->add_(chunks);
  }
}

// Split-invariant dropout's keep decisions of consecutive samples (truebatch/nn/masks.py
// states the hash): for sample r and pair e, with splitmix64's finalizer mix64 and
// arithmetic modulo 2^64,
//     R = mix64((offset + r) * G),   h = mix64((R + e) * G + K),   G = 0x9E3779B97F4A7C15
// and element 2e (2e + 1) kept iff the low (high) 32 bits of h, as an int32, are below
// kept - 2^31.
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Writes keep ? scale : 0 per element (bool output: keep) for samples [begin, end).
template <typename out_t>
void keep_words(int64_t offset, int64_t key, int64_t pairs, int64_t kept, out_t scale,
                out_t* out, int64_t begin, int64_t end) {
  constexpr uint64_t golden = 0x9E3779B97F4A7C15ull;
  const int64_t below = kept - (int64_t(1) << 31);
  for (int64_t r = begin; r < end; ++r) {
    const uint64_t row =
        mix64((static_cast<uint64_t>(offset) + static_cast<uint64_t>(r)) * golden);
    out_t* o = out + r * 2 * pairs;
    for (int64_t e = 0; e < pairs; ++e) {
      const uint64_t h =
          mix64((row + static_cast<uint64_t>(e)) * golden + static_cast<uint64_t>(key));
      o[2 * e] = static_cast<int32_t>(static_cast<uint32_t>(h)) < below ? scale : out_t(0);
      o[2 * e + 1] = static_cast<int32_t>(static_cast<uint32_t>(h >> 32)) < below ? scale : out_t(0);
    }
  }
}

// (samples, 2 * pairs) keep decisions, as bool, or as `scale` / 0 in `dtype` (dropout's
// multiplier, written once instead of a mask, a conversion and a scaling).
at::Tensor sample_keep_words(int64_t offset, int64_t key, int64_t samples, int64_t pairs,
                             int64_t kept, double scale, c10::optional<at::ScalarType> dtype) {
  TORCH_CHECK(samples >= 0 && pairs >= 0 && kept >= 0 && kept < (int64_t(1) << 32),
              "sample_keep_words: got samples=", samples, ", pairs=", pairs, ", kept=", kept);
  at::Tensor out = at::empty({samples, 2 * pairs}, dtype.value_or(at::kBool));
  const int64_t grain = std::max<int64_t>(1, kTaskValues / std::max<int64_t>(1, pairs));
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kBFloat16, at::kHalf, at::kBool, out.scalar_type(),
                                  "sample_keep_words", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t value = dtype.has_value() ? static_cast<scalar_t>(scale) : scalar_t(1);
    at::parallel_for(0, samples, grain, [&](int64_t begin, int64_t end) {
      keep_words<scalar_t>(offset, key, pairs, kept, value, o, begin, end);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(truebatch_cpu, m) {
  m.def(
      "ghost_batch_norm_forward(Tensor x, Tensor? weight, Tensor? bias, int chunks, float eps, "
      "bool channels_last, Tensor? running_weights, Tensor(a!) out) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "ghost_batch_norm_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor save_mean, "
      "Tensor save_rstd, int chunks, float eps, bool channels_last, bool input_grad, "
      "Tensor(a!) grad_x) -> (Tensor, Tensor)");
  m.def(
      "ghost_batch_norm(Tensor x, Tensor? weight, Tensor? bias, int chunks, float eps, "
      "bool channels_last, Tensor? running_weights) -> (Tensor, Tensor, Tensor)");
  m.def(
      "ghost_batch_norm_update(Tensor(a!) running_mean, Tensor(b!) running_var, "
      "Tensor(c!)? num_batches_tracked, float keep, Tensor mean_update, Tensor var_update, "
      "int chunks) -> ()");
  m.def(
      "sample_keep_words(int offset, int key, int samples, int pairs, int kept, float scale, "
      "ScalarType? dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(truebatch_cpu, CPU, m) {
  m.impl("ghost_batch_norm_forward", &ghost_batch_norm_forward);
  m.impl("ghost_batch_norm_backward", &ghost_batch_norm_backward);
  m.impl("ghost_batch_norm_update", &ghost_batch_norm_update);
  m.impl("ghost_batch_norm", &ghost_batch_norm_inference);
}

TORCH_LIBRARY_IMPL(truebatch_cpu, AutogradCPU, m) {
  m.impl("ghost_batch_norm", &ghost_batch_norm_autograd);
}

// No tensor argument to dispatch on: the op is registered for every backend, and makes
// CPU tensors (the caller moves them).
TORCH_LIBRARY_IMPL(truebatch_cpu, CompositeExplicitAutograd, m) {
  m.impl("sample_keep_words", &sample_keep_words);
}
