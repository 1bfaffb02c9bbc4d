// Scaled GEMMs for Hopper (sm90a) built from CUTLASS 3.x collectives.
//
//   w4a16:       D[M, N] = A[M, K] @ dequant(W)[N, K]^T + bias[N], group-wise 4-bit W (W4A16Gemm)
//   int8_wo / fp8_wo: D[M, N] = (A[M, K] @ W[N, K]^T) * scale[N] + bias[N], 8-bit W (W8A16Gemm)
//
//   fp8 / int8:  D[M, N] = sa * sb * (A[M, K] @ B[N, K]^T) + bias[N]
//   fp8_block:   D[M, N] = sum_kb sa[m, kb] * sb[n / 128, kb] * (A @ B^T)[kb] + bias[N]
//
// A is the row-major activation, B the [N, K] weight (K contiguous: the K x N
// operand column-major), D row-major bf16 or fp16.  fp8/int8 scales are float32,
// one value or one per row of A / of B, picked at run time by a broadcast stride
// so one kernel serves fp8_tensor and fp8_rowwise.  fp8_block applies its scales
// in the mainloop, once per 128-wide K block: sa MN-major [K/128, M padded to 4],
// sb K-major [ceil(N/128), K/128].
//
// Each family has a list of tile configurations (Fp8Configs, Int8Configs,
// Fp8BlockConfigs below); each <family>_<dtype>.cu instantiates one family for one
// output dtype with QLP_DEFINE_FAMILY; bindings.cpp is the only file that sees PyTorch.
#pragma once

#include <type_traits>

#include "qlp_gemm.h"

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/functional.h>
#include <cutlass/kernel_hardware_info.h>
#include <cutlass/numeric_types.h>
#include <cutlass/detail/blockwise_scale_layout.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

namespace qlp {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;
using cutlass::gemm::KernelTmaWarpSpecialized;
using cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8FastAccum;
using cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8FastAccum;
using cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8Blockwise;
using cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8Blockwise;
using cutlass::epilogue::TmaWarpSpecialized;
using cutlass::epilogue::TmaWarpSpecializedCooperative;

constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;
constexpr int kAlignAB = 16;  // 16 bytes of 8-bit elements: K % 16 == 0
constexpr int kAlignD = 8;    // 16 bytes of 16-bit elements: N % 8 == 0

// D = sa * (sb * acc) + bias, sa a column (or scalar) broadcast, sb and bias row broadcasts.
// A null scale reads as 1 and a null bias as 0 (the block-scaled GEMM passes no scales here).
template <class TileShape, class ElementD>
using ScaledEpilogue = fusion::Sm90EVT<
    fusion::Sm90Compute<cutlass::homogeneous_multiply_add, ElementD, float, kRound>,
    fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<bool, _0, _0>>,
    fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>,
                    fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, bool, _0>>,
                    fusion::Sm90AccFetch>,
    fusion::Sm90RowBroadcast<0, TileShape, ElementD, float, Stride<_0, _1, _0>>>;

template <class Epilogue, class ElementD>
typename Epilogue::Arguments scaled_epilogue_args(GemmArgs const& g, bool with_scales) {
  const float* sa = with_scales ? g.scale_a : nullptr;
  const float* sb = with_scales ? g.scale_b : nullptr;
  return typename Epilogue::Arguments{
      {sa, 1.0f, {with_scales && g.scale_a_rows, _0{}, _0{}}},
      {{sb, 1.0f, {_0{}, with_scales && g.scale_b_cols, _0{}}}, {}, {}},
      {static_cast<ElementD const*>(g.bias), ElementD(0), {_0{}, _1{}, _0{}}},
      {}};
}

// Stride of a row-major [rows, cols] matrix, batch of 1: A [M, K], B [N, K] (the K x N operand
// column-major) and D [M, N] all use it.
inline auto row_major(int cols) { return make_stride(int64_t(cols), _1{}, int64_t(0)); }

template <class CollectiveMainloop, class CollectiveEpilogue, class Scheduler = cutlass::gemm::PersistentScheduler>
struct Adapter {
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, Scheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  template <class Mainloop, class Epilogue>
  static typename Gemm::Arguments arguments(GemmArgs const& g, Mainloop const& mainloop, Epilogue const& epilogue) {
    return {cutlass::gemm::GemmUniversalMode::kGemm, {g.m, g.n, g.k, 1}, mainloop, epilogue,
            cutlass::KernelHardwareInfo{g.device, g.sm_count}};
  }
};

// fp8 (e4m3) or int8 operands, per-tensor/per-row/per-column scales in the epilogue.
template <class ElementAB, class ElementD, class TileShape, class ClusterShape, class KernelSchedule,
          class EpilogueSchedule>
struct ScaledGemm {
  using ElementAcc = typename std::conditional<std::is_same<ElementAB, int8_t>::value, int32_t, float>::type;
  using Epilogue = ScaledEpilogue<TileShape, ElementD>;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, float, void, cutlass::layout::RowMajor,
      kAlignD, ElementD, cutlass::layout::RowMajor, kAlignD, EpilogueSchedule, Epilogue>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementAB, cutlass::layout::RowMajor, kAlignAB,
      ElementAB, cutlass::layout::ColumnMajor, kAlignAB, ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Run = Adapter<CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = typename Run::Gemm;

  static typename Gemm::Arguments arguments(GemmArgs const& g) {
    typename CollectiveMainloop::Arguments mainloop{
        static_cast<ElementAB const*>(g.a), row_major(g.k), static_cast<ElementAB const*>(g.b),
        row_major(g.k)};
    typename CollectiveEpilogue::Arguments epilogue{scaled_epilogue_args<Epilogue, ElementD>(g, true), nullptr,
                                                    row_major(g.n), static_cast<ElementD*>(g.d),
                                                    row_major(g.n)};
    return Run::arguments(g, mainloop, epilogue);
  }
};

// fp8 (e4m3) with 1x128 activation groups and 128x128 weight blocks, scaled in the mainloop.
// The activation scales are MN-major ([K/128, M] with rows of scale_a_ld >= M, a multiple of 4),
// so the mainloop loads a tile's column of them with TMA alongside A; the weight scales stay
// K-major as the weights store them (one per tile in N, which the mainloop copies either way).
template <class ElementD, class TileShape, class ClusterShape, class KernelSchedule, class EpilogueSchedule>
struct BlockScaledGemm {
  using ElementAB = cutlass::float_e4m3_t;
  using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<1, 128, 128, cute::GMMA::Major::MN,
                                                                  cute::GMMA::Major::K>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());
  using Epilogue = ScaledEpilogue<TileShape, ElementD>;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::RowMajor, kAlignD,
      ElementD, cutlass::layout::RowMajor, kAlignD, EpilogueSchedule, Epilogue>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementAB,
      cute::tuple<cutlass::layout::RowMajor, LayoutSFA>, kAlignAB, ElementAB,
      cute::tuple<cutlass::layout::ColumnMajor, LayoutSFB>, kAlignAB, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Run = Adapter<CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = typename Run::Gemm;

  static typename Gemm::Arguments arguments(GemmArgs const& g) {
    // the scale layouts: activation rows padded to scale_a_ld (rows past M only meet the zero rows
    // TMA fills in past the end of A, and are never stored)
    auto sfa = ScaleConfig::tile_atom_to_shape_SFA(make_shape(g.scale_a_ld, g.n, g.k, 1));
    auto sfb = ScaleConfig::tile_atom_to_shape_SFB(make_shape(g.m, g.n, g.k, 1));
    typename CollectiveMainloop::Arguments mainloop{
        static_cast<ElementAB const*>(g.a), row_major(g.k),
        static_cast<ElementAB const*>(g.b), row_major(g.k),
        g.scale_a, sfa, g.scale_b, sfb};
    typename CollectiveEpilogue::Arguments epilogue{scaled_epilogue_args<Epilogue, ElementD>(g, false), nullptr,
                                                    row_major(g.n), static_cast<ElementD*>(g.d),
                                                    row_major(g.n)};
    return Run::arguments(g, mainloop, epilogue);
  }
};

// W4A16: D^T[N, M] = dequant(W)[N, K] @ X[M, K]^T + bias[N], the operands swapped so the 4-bit weight is
// the MMA's A operand, which the mixed-input mainloop converts in registers after the TMA load
// (wgmma takes A from registers); the activation is B, and D^T column-major is the row-major
// [M, N] output.  Unsigned 4-bit weights q dequantise as q * scale + zero with zero = -zero_point *
// scale (CUTLASS's zero-point form), both per (output channel, group), MN-major and in the
// activation's dtype, which is also the MMA's.  The epilogue adds the bias per output channel.
template <class TileShape, class ElementD>
using ChannelBiasEpilogue = fusion::Sm90EVT<
    fusion::Sm90Compute<cutlass::plus, ElementD, float, kRound>, fusion::Sm90AccFetch,
    fusion::Sm90ColBroadcast<0, TileShape, ElementD, float, Stride<_1, _0, _0>>>;

// Strides of the swapped problem: the weight [N, K] and the activation [M, K] are K-major; D^T
// [N, M] column-major is the output [M, N] row-major.
inline auto col_major(int rows) { return make_stride(_1{}, int64_t(rows), int64_t(0)); }

// The 4-bit weight [N, K] in the MMA-fragment layout (kernels/int4_layout.py), in 4-bit elements:
// atoms of 16 rows x 16 k, a lane's eight A-fragment values in one 32-bit word in the order
// [v0 v2 v4 v6 v1 v3 v5 v7]; row (g, hi) strides (32, 1) and k (e, t, kh) strides (4, 8, 2) in
// an atom; atoms 256 apart along K and 256 * K/16 along N.  Each thread's fragment then leaves
// shared memory in one 32-bit load, and the int4 -> 16-bit conversion takes its fast path.
using Mma16Layout = Layout<Shape<Shape<Shape<_8, _2>, int>, Shape<Shape<_2, _4, _2>, int>, int>,
                           Stride<Stride<Stride<_32, _1>, int64_t>, Stride<Stride<_4, _8, _2>, _256>, int64_t>>;
inline Mma16Layout mma16_layout(int rows, int k) {
  return Mma16Layout(make_shape(make_shape(make_shape(_8{}, _2{}), rows / 16), make_shape(make_shape(_2{}, _4{}, _2{}), k / 16), 1),
                     make_stride(make_stride(make_stride(_32{}, _1{}), int64_t(256) * (k / 16)),
                                 make_stride(make_stride(_4{}, _8{}, _2{}), _256{}), int64_t(rows) * k));
}

template <class ElementD, class TileShape, class ClusterShape, class KernelSchedule, class EpilogueSchedule,
          class Scheduler = cutlass::gemm::PersistentScheduler>
struct W4A16Gemm {
  using ElementW = cutlass::uint4b_t;
  using ElementX = ElementD;  // the activation, the MMA and the output share one 16-bit type
  static constexpr int kAlignW = 32;  // 16 bytes of 4-bit values
  using Epilogue = ChannelBiasEpilogue<TileShape, ElementD>;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::ColumnMajor, kAlignD,
      ElementD, cutlass::layout::ColumnMajor, kAlignD, EpilogueSchedule, Epilogue>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cute::tuple<ElementW, ElementX, ElementX>,
      Mma16Layout, kAlignW, ElementX, cutlass::layout::ColumnMajor, kAlignD, float, TileShape,
      ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Run = Adapter<CollectiveMainloop, CollectiveEpilogue, Scheduler>;
  using Gemm = typename Run::Gemm;
  static typename Gemm::Arguments arguments(GemmArgs const& g) {
    const int scale_k = g.k / g.group_size;
    typename CollectiveMainloop::Arguments mainloop{
        static_cast<ElementW const*>(g.a), mma16_layout(g.m, g.k), static_cast<ElementX const*>(g.b), row_major(g.k),
        static_cast<ElementX const*>(g.group_scale),
        make_stride(_1{}, int64_t(g.m), int64_t(g.m) * scale_k), g.group_size,
        static_cast<ElementX const*>(g.group_zero)};
    typename CollectiveEpilogue::Arguments epilogue{
        {{}, {static_cast<ElementD const*>(g.bias), ElementD(0), {_1{}, _0{}, _0{}}}, {}},
        nullptr, col_major(g.m), static_cast<ElementD*>(g.d), col_major(g.m)};
    return Run::arguments(g, mainloop, epilogue);
  }
};

// W8A16 (int8_weight_only, fp8_weight_only): D^T[N, M] = scale[N] * (W[N, K] @ X[M, K]^T) + bias[N],
// swapped as W4A16; the mainloop converts the 8-bit weight to the activation's dtype, which holds
// every int8 and e4m3 value exactly, and the epilogue applies the per-channel scale in fp32.
template <class TileShape, class ElementD>
using ChannelScaleBiasEpilogue = fusion::Sm90EVT<
    fusion::Sm90Compute<cutlass::homogeneous_multiply_add, ElementD, float, kRound>,
    fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<_1, _0, _0>>, fusion::Sm90AccFetch,
    fusion::Sm90ColBroadcast<0, TileShape, ElementD, float, Stride<_1, _0, _0>>>;

template <class ElementW, class ElementD, class TileShape, class ClusterShape, class KernelSchedule,
          class EpilogueSchedule, class Scheduler = cutlass::gemm::PersistentScheduler>
struct W8A16Gemm {
  using ElementX = ElementD;
  using Epilogue = ChannelScaleBiasEpilogue<TileShape, ElementD>;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::ColumnMajor, kAlignD,
      ElementD, cutlass::layout::ColumnMajor, kAlignD, EpilogueSchedule, Epilogue>::CollectiveOp;
  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementW, cutlass::layout::RowMajor, kAlignAB, ElementX,
      cutlass::layout::ColumnMajor, kAlignD, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;
  using Run = Adapter<CollectiveMainloop, CollectiveEpilogue, Scheduler>;
  using Gemm = typename Run::Gemm;
  static typename Gemm::Arguments arguments(GemmArgs const& g) {
    typename CollectiveMainloop::Arguments mainloop{static_cast<ElementW const*>(g.a), row_major(g.k),
                                                    static_cast<ElementX const*>(g.b), row_major(g.k)};
    typename CollectiveEpilogue::Arguments epilogue{
        {{g.scale_a, 1.0f, {_1{}, _0{}, _0{}}}, {}, {static_cast<ElementD const*>(g.bias), ElementD(0), {_1{}, _0{}, _0{}}}, {}},
        nullptr, col_major(g.m), static_cast<ElementD*>(g.d), col_major(g.m)};
    return Run::arguments(g, mainloop, epilogue);
  }
};

template <class T>
struct Tag {
  using type = T;
};

// --- the tile configurations of each family ----------------------------------------------------
// Index i of a family's Configs list is configuration i of the C entry points; Python picks one by
// M, N and K (backends/cutlass.py, tile_config) and finds it by name; benchmarks/bench_cutlass_tiles.py
// times every configuration.  Decode-sized M wants 64-row tiles (less wasted MMA work) and clusters
// along N that multicast the activation tile; prefill wants 128x128 tiles in 2-CTA clusters.

template <class... Configs>
struct ConfigList {
  static constexpr int count = sizeof...(Configs);

  // f(Tag<Config>{}) for the config at `index` (which the caller has checked); R{} otherwise.
  template <class R, class F>
  static R visit(int index, F&& f) {
    R result{};
    int i = 0;
    (void)((i++ == index ? (result = f(Tag<Configs>{}), true) : false) || ...);
    return result;
  }

  static const char* name(int index) {
    const char* names[] = {Configs::name...};
    return index >= 0 && index < count ? names[index] : nullptr;
  }
};

template <class ElementD>
struct Fp8Configs {
  using E = cutlass::float_e4m3_t;
  struct C0 : ScaledGemm<E, ElementD, Shape<_64, _64, _128>, Shape<_1, _8, _1>,
                         KernelTmaWarpSpecializedPingpongFP8FastAccum, TmaWarpSpecialized> {
    static constexpr const char* name = "64x64x128 c1x8 pingpong";
  };
  struct C1 : ScaledGemm<E, ElementD, Shape<_64, _128, _128>, Shape<_2, _1, _1>,
                         KernelTmaWarpSpecializedPingpongFP8FastAccum, TmaWarpSpecialized> {
    static constexpr const char* name = "64x128x128 c2x1 pingpong";
  };
  struct C2 : ScaledGemm<E, ElementD, Shape<_128, _128, _128>, Shape<_2, _1, _1>,
                         KernelTmaWarpSpecializedPingpongFP8FastAccum, TmaWarpSpecialized> {
    static constexpr const char* name = "128x128x128 c2x1 pingpong";
  };
  using List = ConfigList<C0, C1, C2>;
};

template <class ElementD>
struct Int8Configs {
  using E = int8_t;
  struct C0 : ScaledGemm<E, ElementD, Shape<_64, _128, _256>, Shape<_1, _8, _1>, KernelTmaWarpSpecialized,
                         TmaWarpSpecialized> {
    static constexpr const char* name = "64x128x256 c1x8";
  };
  struct C1 : ScaledGemm<E, ElementD, Shape<_64, _128, _128>, Shape<_2, _1, _1>, KernelTmaWarpSpecializedPingpong,
                         TmaWarpSpecialized> {
    static constexpr const char* name = "64x128x128 c2x1 pingpong";
  };
  struct C2 : ScaledGemm<E, ElementD, Shape<_128, _128, _128>, Shape<_2, _1, _1>, KernelTmaWarpSpecializedPingpong,
                         TmaWarpSpecialized> {
    static constexpr const char* name = "128x128x128 c2x1 pingpong";
  };
  using List = ConfigList<C0, C1, C2>;
};

template <class ElementD>
struct Fp8BlockConfigs {
  struct C0 : BlockScaledGemm<ElementD, Shape<_64, _128, _128>, Shape<_1, _1, _1>,
                              KernelTmaWarpSpecializedPingpongFP8Blockwise, TmaWarpSpecialized> {
    static constexpr const char* name = "64x128x128 pingpong";
  };
  struct C1 : BlockScaledGemm<ElementD, Shape<_128, _128, _128>, Shape<_1, _2, _1>,
                              KernelTmaWarpSpecializedCooperativeFP8Blockwise, TmaWarpSpecializedCooperative> {
    static constexpr const char* name = "128x128x128 c1x2 cooperative";
  };
  struct C2 : BlockScaledGemm<ElementD, Shape<_128, _128, _128>, Shape<_2, _1, _1>,
                              KernelTmaWarpSpecializedCooperativeFP8Blockwise, TmaWarpSpecializedCooperative> {
    static constexpr const char* name = "128x128x128 c2x1 cooperative";
  };
  using List = ConfigList<C0, C1, C2>;
};

// Tiles are (weight rows, tokens, K); K 64 = one 128-byte row of 16-bit activation, and the group
// size must be a multiple of it.  The 4-bit operand passes through registers, so tiles stay small
// (register pressure).  Few tokens leave few tiles (N / 128): stream-K splits their K loops over
// all SMs.
template <class ElementD>
struct W4A16Configs {
  template <class TileShape>
  using StreamK = W4A16Gemm<ElementD, TileShape, Shape<_1, _1, _1>, KernelTmaWarpSpecializedCooperative,
                            TmaWarpSpecializedCooperative, cutlass::gemm::StreamKScheduler>;
  struct C0 : W4A16Gemm<ElementD, Shape<_128, _128, _64>, Shape<_1, _1, _1>, KernelTmaWarpSpecializedCooperative,
                        TmaWarpSpecializedCooperative> {
    static constexpr const char* name = "128x128x64 cooperative";
  };
  struct C1 : W4A16Gemm<ElementD, Shape<_128, _64, _64>, Shape<_1, _1, _1>, KernelTmaWarpSpecializedPingpong,
                        TmaWarpSpecialized> {
    static constexpr const char* name = "128x64x64 pingpong";
  };
  struct C2 : W4A16Gemm<ElementD, Shape<_128, _256, _64>, Shape<_1, _1, _1>, KernelTmaWarpSpecializedCooperative,
                        TmaWarpSpecializedCooperative> {
    static constexpr const char* name = "128x256x64 cooperative";
  };
  struct C3 : StreamK<Shape<_128, _64, _64>> { static constexpr const char* name = "128x64x64 cooperative stream-K"; };
  struct C4 : StreamK<Shape<_128, _128, _64>> { static constexpr const char* name = "128x128x64 cooperative stream-K"; };
  struct C5 : StreamK<Shape<_128, _256, _64>> { static constexpr const char* name = "128x256x64 cooperative stream-K"; };
  struct C6 : W4A16Gemm<ElementD, Shape<_64, _128, _64>, Shape<_1, _1, _1>, KernelTmaWarpSpecializedPingpong,
                        TmaWarpSpecialized> {
    static constexpr const char* name = "64x128x64 pingpong";
  };
  // M <= 64: 32-token tiles, and K 128 (groups of a multiple of 128): half the mainloop iterations
  // (barriers, scale loads) of K 64 for the same bytes (h200/prefill/cutlass_w4a16_k128; 128x128x128
  // stream-K, also timed there, was never the fastest)
  struct C7 : StreamK<Shape<_128, _64, _128>> { static constexpr const char* name = "128x64x128 cooperative stream-K"; };
  struct C8 : StreamK<Shape<_128, _32, _128>> { static constexpr const char* name = "128x32x128 cooperative stream-K"; };
  struct C9 : StreamK<Shape<_128, _32, _64>> { static constexpr const char* name = "128x32x64 cooperative stream-K"; };
  // (two CTAs along the weight rows sharing the activation tile by TMA multicast, 128x256x64 c2x1,
  // measured 2-8% slower than C2 at M = 1024 / 2048: h200/prefill/cutlass_w4a16_cluster; 256x128x64
  // tiles, cooperative and stream-K, 0-41% slower than C2 / C5 at M = 1024-4096 in every family, twice the
  // conversion work an MMA: h200/prefill/cutlass_wo_256rows)
  using List = ConfigList<C0, C1, C2, C3, C4, C5, C6, C7, C8, C9>;
};

// The 8-bit weight-only families: W4A16's tiles (the same swapped problem; K 64 is 64 bytes of weight).
template <class ElementW>
struct W8A16Configs {
  template <class ElementD>
  struct Of {
    template <class TileShape>
    using StreamK = W8A16Gemm<ElementW, ElementD, TileShape, Shape<_1, _1, _1>, KernelTmaWarpSpecializedCooperative,
                              TmaWarpSpecializedCooperative, cutlass::gemm::StreamKScheduler>;
    struct C0 : StreamK<Shape<_128, _64, _64>> { static constexpr const char* name = "128x64x64 cooperative stream-K"; };
    struct C1 : StreamK<Shape<_128, _128, _64>> { static constexpr const char* name = "128x128x64 cooperative stream-K"; };
    struct C2 : W8A16Gemm<ElementW, ElementD, Shape<_128, _128, _64>, Shape<_1, _1, _1>,
                          KernelTmaWarpSpecializedCooperative, TmaWarpSpecializedCooperative> {
      static constexpr const char* name = "128x128x64 cooperative";
    };
    struct C3 : W8A16Gemm<ElementW, ElementD, Shape<_128, _256, _64>, Shape<_1, _1, _1>,
                          KernelTmaWarpSpecializedCooperative, TmaWarpSpecializedCooperative> {
      static constexpr const char* name = "128x256x64 cooperative";
    };
    struct C4 : StreamK<Shape<_128, _256, _64>> { static constexpr const char* name = "128x256x64 cooperative stream-K"; };
    struct C5 : W8A16Gemm<ElementW, ElementD, Shape<_64, _128, _64>, Shape<_1, _1, _1>,
                          KernelTmaWarpSpecializedPingpong, TmaWarpSpecialized> {
      static constexpr const char* name = "64x128x64 pingpong";
    };
    // M <= 64: 32-token tiles, and K 128 (a 128-byte line of each weight row an iteration):
    // h200/prefill/cutlass_wo8_k128
    struct C6 : StreamK<Shape<_128, _32, _64>> { static constexpr const char* name = "128x32x64 cooperative stream-K"; };
    struct C7 : StreamK<Shape<_128, _32, _128>> { static constexpr const char* name = "128x32x128 cooperative stream-K"; };
    struct C8 : StreamK<Shape<_128, _64, _128>> { static constexpr const char* name = "128x64x128 cooperative stream-K"; };
    using List = ConfigList<C0, C1, C2, C3, C4, C5, C6, C7, C8>;
  };
};

template <class ElementD>
using Int8WeightOnlyConfigs = typename W8A16Configs<int8_t>::template Of<ElementD>;
template <class ElementD>
using Fp8WeightOnlyConfigs = typename W8A16Configs<cutlass::float_e4m3_t>::template Of<ElementD>;

// --- running one configuration ---------------------------------------------------------------

template <class Config>
size_t workspace_size(GemmArgs const& g) {
  return Config::Gemm::get_workspace_size(Config::arguments(g));
}

template <class Config>
const char* run(GemmArgs const& g, void* workspace, cudaStream_t stream) {
  typename Config::Gemm gemm;
  auto args = Config::arguments(g);
  if (gemm.can_implement(args) != cutlass::Status::kSuccess)
    return "CUTLASS cannot implement this problem (alignment of M, N, K or the pointers)";
  if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess)
    return "CUTLASS failed to initialize the GEMM (TMA descriptors or workspace)";
  if (gemm.run(stream) != cutlass::Status::kSuccess) return "CUTLASS failed to launch the GEMM";
  return nullptr;
}

}  // namespace qlp

// Defines the extern "C" entry points of qlp_gemm.h for one family and output dtype.
#define QLP_DEFINE_FAMILY(CONFIGS, ElementD, SUFFIX)                                                  \
  using qlp_configs_##SUFFIX = typename CONFIGS<ElementD>::List;                                      \
  QLP_API int qlp_config_count_##SUFFIX() { return qlp_configs_##SUFFIX::count; }                 \
  QLP_API const char* qlp_config_name_##SUFFIX(int config) {                                       \
    return qlp_configs_##SUFFIX::name(config);                                                        \
  }                                                                                                    \
  QLP_API size_t qlp_workspace_##SUFFIX(const qlp::GemmArgs* g, int config) {                      \
    return qlp_configs_##SUFFIX::visit<size_t>(config, [&](auto tag) {                                 \
      return qlp::workspace_size<typename decltype(tag)::type>(*g);                                    \
    });                                                                                                \
  }                                                                                                    \
  QLP_API const char* qlp_run_##SUFFIX(const qlp::GemmArgs* g, int config, void* ws,               \
                                          cudaStream_t stream) {                                      \
    if (config < 0 || config >= qlp_configs_##SUFFIX::count) return "no such tile configuration";     \
    return qlp_configs_##SUFFIX::visit<const char*>(config, [&](auto tag) {                            \
      return qlp::run<typename decltype(tag)::type>(*g, ws, stream);                                   \
    });                                                                                                \
  }
