"""GPU diagnostic: where does a NaN in a per-group quant go? (kept for the next session)"""
import numpy as np, jax, jax.numpy as jnp
from interop.keys import kFp8Dynamic128Sym, kFp8DynamicTokenSym, kFp8Dynamic64Sym
from quantact_jax import producers as P
x = np.random.default_rng(4).standard_normal((4, 256)).astype(np.float32); x[1, 5] = np.nan
for name, key in [("tok", kFp8DynamicTokenSym), ("g128", kFp8Dynamic128Sym), ("g64", kFp8Dynamic64Sym),
                  ("g128-ue8m0", kFp8Dynamic128Sym.with_layout("row_major", ue8m0=True))]:
    for bc in ("auto", 0):
        orig = P._chunk_width
        if bc == 0:
            P._chunk_width = lambda *a, **k: 0
        try:
            qa = P.quantize(jnp.asarray(x), key)
            s = np.asarray(qa.scale, np.float32).reshape(4, -1)
            d = np.asarray(qa.data.astype(jnp.float32))
            print(f"{name:11s} bc={bc}: scale row1 {s[1]}  data[1,:8] {d[1,:8]}")
        finally:
            P._chunk_width = orig
