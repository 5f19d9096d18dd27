"""The child scripts of ``startup.py``, each job's library and torchvision code side by side.

A child is ``PRELUDE`` + its parts + ``EPILOGUE``, run as ``python -c``; it reads its
parameters (``P``) and the fixture paths (``F``) from its arguments and times its stages with
``mark``.
"""

MARKER = "STARTUP-MARKS "

# Shared by every child script: its parameters (P), the fixture paths (F) and mark(), which
# adds the time since the previous mark to a stage; the stages are printed last, after MARKER.
PRELUDE = """\
import json, sys, time
_last, MARKS = time.perf_counter(), {}
P, F = json.loads(sys.argv[1]), json.loads(sys.argv[2])
def mark(name):
    global _last
    now = time.perf_counter()
    MARKS[name], _last = MARKS.get(name, 0.0) + now - _last, now
"""
EPILOGUE = f"\nprint({MARKER!r} + json.dumps(MARKS), flush=True)\n"

# What each side imports, then builds: a random-weight model and a batch of 2 at 224x224.
JAX_HEAD = """\
import jax, numpy as np
from flax import nnx
import resnext_flax
resnext_flax.enable_compilation_cache()  # as the docs tell notebooks and services to
mark("import")
"""
JAX_MODEL = """\
model = resnext_flax.create_model(P["model"], rngs=nnx.Rngs(0))
x = jax.numpy.asarray(np.random.default_rng(0).random((2, 224, 224, 3), np.float32))
"""
TORCH_HEAD = """\
import torch, torchvision
torch.set_num_threads(P["threads"])
mark("import")
"""
TORCH_MODEL = """\
model = torchvision.models.get_model(P["model"])
x = torch.rand(2, 3, 224, 224)
"""

# The package resolves its names lazily: the quick start's first name (create_model, which
# brings in the models and JAX) is what makes the import usable.
LIBRARY_IMPORT = """\
import resnext_flax
mark("import")
resnext_flax.create_model
mark("create_model")
"""

TORCH_LIST = """\
from torchvision.models import get_model_weights, list_models
rows = [("model", "weights", "acc@1", "acc@5", "params", "GFLOPS", "file", "resize/crop")]
for name in list_models(module=torchvision.models,
                        include=["resnet*", "resnext*", "wide_resnet*"]):
    for w in get_model_weights(name):
        m, t = w.meta, w.transforms()
        acc = m["_metrics"]["ImageNet-1K"]
        rows.append((name, w.name, f"{acc['acc@1']:.3f}", f"{acc['acc@5']:.3f}",
                     f"{m['num_params'] / 1e6:.1f}M", f"{m['_ops']:.2f}",
                     f"{m['_file_size']:.1f} MB", f"{t.resize_size[0]}/{t.crop_size[0]}"))
widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
print("\\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows))
"""

TORCH_PREDICT = """\
from PIL import Image
weights = torchvision.models.get_model_weights(P["model"])[P["weights"]]
model = torchvision.models.get_model(P["model"])
model.load_state_dict(torch.load(F["pth"], weights_only=True))
model.eval()
mark("build")
transform = weights.transforms()
images = [F["china"], F["flower"]]
batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
with torch.inference_mode():
    top = model(batch).softmax(-1).topk(5)
for path, ps, ids in zip(images, top.values, top.indices):
    print(path)
    for rank, (p, i) in enumerate(zip(ps, ids), start=1):
        print(f"  {rank}. {weights.meta['categories'][i]:<40} {100 * float(p):6.2f}%")
mark("first_call")
"""

JAX_FORWARD = """\
model.eval()
mark("build")
jax.block_until_ready(model(x))
mark("first_call")
"""

TORCH_FORWARD = """\
model.eval()
mark("build")
with torch.inference_mode():
    model(x)
mark("first_call")
"""

JAX_TRAIN = """\
from resnext_flax import training
labels = jax.numpy.asarray([1, 2])
mark("build")
state = training.create_train_state(model, training.sgd(0.1))
mark("optimizer")
jax.block_until_ready(training.train_step(state, x, labels))
mark("first_call")
"""

TORCH_TRAIN = """\
model.train()
labels = torch.tensor([1, 2])
mark("build")
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
mark("optimizer")
optimizer.zero_grad()
torch.nn.functional.cross_entropy(model(x), labels).backward()
optimizer.step()
mark("first_call")
"""

# The fixtures: a torchvision ResNet-50 with random weights and BatchNorm statistics.
MAKE_PTH = """\
torch.manual_seed(0)
model = torchvision.models.resnet50()
for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
        n = m.num_features
        m.running_mean.copy_(0.1 * torch.randn(n))
        m.running_var.copy_(torch.empty(n).uniform_(0.5, 1.5))
        m.weight.data.copy_(torch.empty(n).uniform_(0.5, 1.5))
        m.bias.data.copy_(0.1 * torch.randn(n))
torch.save(model.state_dict(), F["pth"])
"""
