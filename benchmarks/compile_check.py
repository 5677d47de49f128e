"""Compile the triton kernels for sm_90 on a machine without a GPU (warmup=True: compile, no launch)."""
import sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
class Fake:
    def get_current_device(self): return 0
    def get_current_stream(self, d=None): return 0
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
    def get_active_torch_device(self): return torch.device("cpu")
driver.set_active(Fake())
from spattn.ops.attention.impl.triton import _launch, _forward, _backward, _tuning, _plan
import spattn
# route launches to warmup
orig = triton.runtime.jit.JITFunction.run
def run(self, *a, grid, warmup, **k):
    k2 = dict(k)
    kern = orig(self, *a, grid=grid, warmup=True, **k2)
    md = kern.metadata
    print(f"  {self.fn.__name__:28s} regs? shared={md.shared} warps={md.num_warps} stages={md.num_stages}", flush=True)
    try:
        n_spill = kern.n_spills
    except Exception: pass
    return kern
triton.runtime.jit.JITFunction.run = run
_tuning.choose.__globals__  # keep
import spattn.ops.attention.impl.triton._tuning as T
cfgs = {"fwd": [T.Config(128, 64, 8, 3), T.Config(128, 64, 8, 3, True)], "dq": [T.Config(128,64,8,3)], "dkdv":[T.Config(64,128,8,3)], "decode":[T.Config(16,64,4,3)]}
def choose(kernel, D, dtype, facts, device, bs, bench=None, pairs=0, even=True):
    return cfgs[kernel][0]
T.choose = choose
_launch._tuning.choose = choose
_launch._num_sms = lambda d: 132
for D in (64, 128):
  for band in ([], [1024, 0, 64, 0, 1]):
    L = 1024
    q = torch.randn(1, 4, L, D, dtype=torch.bfloat16); k = torch.randn(1, 2, L, D, dtype=torch.bfloat16)
    lay = spattn.compile(spattn.Sinks(64)|spattn.Window(256), L, causal=True, block_size=128)
    T_ = [getattr(lay, n) for n in ("kv_num_blocks","kv_indices","kv_mask_ids","full_kv_num_blocks","full_kv_indices")]
    print("D", D, "band", band)
    for pers in (False, True):
        cfgs["fwd"] = [T.Config(128, 64, 8 if D > 64 else 4, 3, pers)]
        _launch.forward(q, k, k, *T_, lay.masks, 0.1, band)
    _launch.decode(q[:, :, :1], k, k, *T_, lay.masks, 0.1, band)
    _launch.backward(q, q, k, k, q, torch.zeros(1,4,L), None, *T_, lay.q_num_blocks, lay.q_indices, lay.q_mask_ids, lay.full_q_num_blocks, lay.full_q_indices, lay.masks, 0.1)
