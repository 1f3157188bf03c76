// The fused kernels for one student dtype (__nv_bfloat16) and every teacher dtype: one unit per
// student dtype, so that the extension's kernels compile in parallel.
#include "kd_launch.cuh"

namespace fastkd {
template void launch_kd<__nv_bfloat16, float>(const KdLaunch&, const __nv_bfloat16*, const float*, __nv_bfloat16*, float*);
template void launch_kd<__nv_bfloat16, __half>(const KdLaunch&, const __nv_bfloat16*, const __half*, __nv_bfloat16*, __half*);
template void launch_kd<__nv_bfloat16, __nv_bfloat16>(const KdLaunch&, const __nv_bfloat16*, const __nv_bfloat16*, __nv_bfloat16*, __nv_bfloat16*);
}  // namespace fastkd
