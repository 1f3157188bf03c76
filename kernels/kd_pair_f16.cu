// The fused kernels for one student dtype (__half) and every teacher dtype: one unit per
// student dtype, so that the extension's kernels compile in parallel.
#include "kd_launch.cuh"

namespace fastkd {
template void launch_kd<__half, float>(const KdLaunch&, const __half*, const float*, __half*, float*);
template void launch_kd<__half, __half>(const KdLaunch&, const __half*, const __half*, __half*, __half*);
template void launch_kd<__half, __nv_bfloat16>(const KdLaunch&, const __half*, const __nv_bfloat16*, __half*, __nv_bfloat16*);
}  // namespace fastkd
