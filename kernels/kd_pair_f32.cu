// The fused kernels for one student dtype (float) and every teacher dtype: one unit per
// student dtype, so that the extension's kernels compile in parallel.
#include "kd_launch.cuh"

namespace fastkd {
template void launch_kd<float, float>(const KdLaunch&, const float*, const float*, float*, float*);
template void launch_kd<float, __half>(const KdLaunch&, const float*, const __half*, float*, __half*);
template void launch_kd<float, __nv_bfloat16>(const KdLaunch&, const float*, const __nv_bfloat16*, float*, __nv_bfloat16*);
}  // namespace fastkd
