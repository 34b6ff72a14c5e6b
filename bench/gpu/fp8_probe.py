import torch
d="cuda"
def bench(f, n=50):
    for _ in range(5): f()
    torch.cuda.synchronize(); s=torch.cuda.Event(enable_timing=True); e=torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n): f()
    e.record(); torch.cuda.synchronize(); return s.elapsed_time(e)/n
for M,K,N in [(8192,640,5120),(8192,2560,640),(8192,640,640),(2048,1280,10240),(2048,5120,1280),(2048,1280,1280)]:
    a=torch.randn(M,K,device=d,dtype=torch.bfloat16); b=torch.randn(N,K,device=d,dtype=torch.bfloat16)
    tb=bench(lambda: a@b.t())
    a8=a.to(torch.float8_e4m3fn); b8=b.to(torch.float8_e4m3fn)
    sa=torch.ones(M,1,device=d); sb=torch.ones(1,N,device=d)
    try:
        t8=bench(lambda: torch._scaled_mm(a8,b8.t(),scale_a=sa,scale_b=sb,out_dtype=torch.bfloat16))
    except Exception as ex:
        t8=float('nan'); print(ex)
    fl=2*M*K*N
    print(f"{M}x{K}x{N}: bf16 {tb*1e3:.1f} us {fl/tb/1e9:.0f} TF/s | fp8 rowwise {t8*1e3:.1f} us {fl/t8/1e9:.0f} TF/s")
