import numpy as np, time, ml_dtypes, numba
from numoe._cpu import experts as C
from numoe._cpu._narrow import kind_of
numba.set_num_threads(1)
K=N=2048; nW=12
rng=np.random.default_rng(0)
for M in (1,4):
  for dt in (np.float32, ml_dtypes.bfloat16, np.int8):
    Ws=[(rng.standard_normal((K,N))*(50 if dt==np.int8 else 1)).astype(dt) for _ in range(nW)]
    x=rng.standard_normal((M,K)).astype(np.float32)
    acc=np.empty((M,N),np.float32)
    sc=np.ones(N,np.float32) if dt==np.int8 else np.zeros(0,np.float32)
    kd=kind_of(np.dtype(dt))
    Wb=[w.view(np.uint16) if w.dtype.itemsize==2 else w for w in Ws]
    C.stream_matmul(x,Wb[0],kd,sc,0,N,acc,0)
    best=1e9
    for rep in range(3):
        t0=time.perf_counter()
        for w in Wb: C.stream_matmul(x,w,kd,sc,0,N,acc,0)
        best=min(best,time.perf_counter()-t0)
    by=sum(w.nbytes for w in Ws)
    print(M, np.dtype(dt).name, "%.2f ms/matrix  %.1f GB/s  %.1f GFLOP/s"%(best/nW*1e3, by/best/1e9, 2*M*K*N*nW/best/1e9))
