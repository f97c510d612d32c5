// One core's fp32 FMA peak (benchmarks/NOTES.md and RESULTS.md, 2026-12-02: the "physical" compute
// ceiling that torch.mm, MKL's AVX2 path on AMD CPUs, does not reach). 24 independent zmm FMA chains,
// then 12 ymm chains. Build and run (one core, AVX-512 CPU):
//   g++ -O2 -march=native benchmarks/fma_peak.cpp -o /tmp/fma_peak && /tmp/fma_peak
#include <immintrin.h>
#include <chrono>
#include <cstdio>
int main(){
  __m512 a[24]; for(int i=0;i<24;i++) a[i]=_mm512_set1_ps(1.0f+i*1e-7f);
  __m512 b=_mm512_set1_ps(0.9999999f), c=_mm512_set1_ps(1e-8f);
  long iters=100000000/4;
  for(int rep=0;rep<3;rep++){
  auto t0=std::chrono::steady_clock::now();
  for(long it=0;it<iters;it++){
    #pragma GCC unroll 24
    for(int i=0;i<24;i++) a[i]=_mm512_fmadd_ps(a[i],b,c);
  }
  double s=std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count();
  float sum=0; for(int i=0;i<24;i++) sum+=_mm512_reduce_add_ps(a[i]);
  printf("zmm: %.1f GFLOP/s (%g)\n", iters*24.0*32/s/1e9, sum);
  }
  __m256 y[24]; for(int i=0;i<24;i++) y[i]=_mm256_set1_ps(1.0f);
  __m256 yb=_mm256_set1_ps(0.9999999f), yc=_mm256_set1_ps(1e-8f);
  auto t0=std::chrono::steady_clock::now();
  for(long it=0;it<iters;it++){
    #pragma GCC unroll 24
    for(int i=0;i<12;i++) y[i]=_mm256_fmadd_ps(y[i],yb,yc);
  }
  double s=std::chrono::duration<double>(std::chrono::steady_clock::now()-t0).count();
  float sum=0; for(int i=0;i<12;i++) sum+=y[i][0];
  printf("ymm: %.1f GFLOP/s (%g)\n", iters*12.0*16/s/1e9, sum);
}
