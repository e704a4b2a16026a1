"""Keras itself is the reference: the seed's model on Keras 3's torch backend.

- ``.h5`` files Keras writes (and the Keras 2 layout the notebook wrote) import into ``UNet`` and
  give Keras' outputs; files of another topology are refused naming the layer.
- ``l2(w)`` on every kernel under Keras' Adam/SGD is ``weight_decay = 2*w`` on our kernel group:
  same gradients, same weights after a few steps, same reported loss. AdamW is not.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from keras_ref import SEED_PARAMS, conv_layers, keras, randomize_biases, seed_model, write_keras2_h5
from unet_pl import LitUNet, UNet
from unet_pl.keras import load_keras_weights, read_keras_convs, unet_from_keras
from unet_pl.model import conv_layers as torch_conv_layers
from unet_pl.optim import build_optimizer, l2_penalty, param_groups

pytestmark = [  # Keras-internal noise on the torch backend, not ours
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The structure of `inputs` doesn't match the expected structure:UserWarning"),
]

W = 1e-3  # Keras' l2 coefficient in the L2 tests
STEPS = 5
SIZE = 32  # the net is fully convolutional: training parity at 32x32 keeps the tests fast


def to_torch(x_nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))


def max_rel_diff(kmodel, net) -> float:
    """Largest ``max|ours - keras| / max|keras|`` over every kernel and bias tensor."""
    worst = 0.0
    for layer, m in zip(conv_layers(kmodel), torch_conv_layers(net)):
        kernel, bias = layer.get_weights()
        for ref, ours in ((torch.from_numpy(kernel).permute(3, 2, 0, 1), m.weight), (torch.from_numpy(bias), m.bias)):
            worst = max(worst, ((ours.detach() - ref).abs().max() / ref.abs().max()).item())
    return worst


# --- importing weights ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seed_files(tmp_path_factory):
    """The seed model (128x128, non-zero biases) in every layout, and Keras' outputs on 2 images."""
    tmp = tmp_path_factory.mktemp("keras")
    model = seed_model(128)
    randomize_biases(model)
    files = {
        "keras3_model_save.h5": tmp / "model.h5",
        "keras3_save_weights.weights.h5": tmp / "model.weights.h5",
        "keras2_model_save.h5": tmp / "keras2.h5",
        "keras2_save_weights.h5": tmp / "keras2_weights.h5",
    }
    model.save(files["keras3_model_save.h5"])  # legacy HDF5, as ModelCheckpoint("x.h5") writes it
    model.save_weights(files["keras3_save_weights.weights.h5"])
    write_keras2_h5(model, files["keras2_model_save.h5"])
    write_keras2_h5(model, files["keras2_save_weights.h5"], with_config=False)
    images = np.random.default_rng(0).integers(0, 256, (2, 128, 128, 3)).astype("float32")  # the seed's input range
    probs = np.asarray(model.predict(images, verbose=0))  # Lambda(x / 255) -> ... -> sigmoid
    return model, files, images, probs


def test_seed_model_has_485817_parameters_in_keras_and_torch(seed_files):
    model = seed_files[0]
    assert model.count_params() == SEED_PARAMS
    assert sum(p.numel() for p in UNet().parameters()) == SEED_PARAMS


def test_keras_layer_order_is_unet_layer_order(seed_files):
    """Keras' Conv2D/Conv2DTranspose layers, in model order, have our kernels' shapes (Keras layout)."""
    keras_shapes = [tuple(layer.kernel.shape) for layer in conv_layers(seed_files[0])]
    ours = [tuple(m.weight.shape[i] for i in (2, 3, 1, 0)) for m in torch_conv_layers(UNet())]
    assert keras_shapes == ours
    kinds = [type(layer).__name__ for layer in conv_layers(seed_files[0])]
    assert kinds == [{"Conv2d": "Conv2D", "ConvTranspose2d": "Conv2DTranspose"}[type(m).__name__] for m in torch_conv_layers(UNet())]


@pytest.mark.parametrize("layout", ["keras3_model_save.h5", "keras3_save_weights.weights.h5", "keras2_model_save.h5", "keras2_save_weights.h5"])
def test_imported_weights_give_keras_outputs(seed_files, layout):
    _, files, images, probs = seed_files
    net = load_keras_weights(UNet(), files[layout]).eval()
    with torch.no_grad():
        ours = torch.sigmoid(net(to_torch(images) / 255.0))  # our UNet takes [0, 1]: the Lambda is the data's job
    diff = np.abs(ours.numpy().transpose(0, 2, 3, 1) - probs).max()
    assert diff < 1e-5, f"{layout}: max abs difference {diff:.2e}"


def test_keras2_file_carries_keras2_names(seed_files):
    """The hand-written Keras 2 file is what the notebook's h5 looks like (names with :0, from _1)."""
    with h5py.File(seed_files[1]["keras2_model_save.h5"], "r") as f:
        group = f["model_weights"]
        assert b"conv2d_1" in list(group.attrs["layer_names"])
        assert list(group["conv2d_1"].attrs["weight_names"]) == [b"conv2d_1/kernel:0", b"conv2d_1/bias:0"]
        assert group["conv2d_1/conv2d_1/kernel:0"].shape == (3, 3, 3, 8)
    convs, ordered = read_keras_convs(seed_files[1]["keras2_model_save.h5"])
    assert ordered and len(convs) == 23 and sum(c.transposed for c in convs) == 4


def test_imported_unet_loads_into_litunet(seed_files):
    """LitUNet's channels_last UNet takes the weights too (copy_ keeps its memory format)."""
    _, files, images, probs = seed_files
    lit = LitUNet()
    load_keras_weights(lit.unet, files["keras3_model_save.h5"])
    lit.eval()
    with torch.no_grad():
        ours = torch.sigmoid(lit(lit.prepare_images(to_torch(images).to(torch.uint8))))
    assert np.abs(ours.numpy().transpose(0, 2, 3, 1) - probs).max() < 1e-5


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="TensorFlow not installed")
def test_imported_weights_match_keras_on_tensorflow(seed_files, tmp_path):
    """The notebook ran on TensorFlow: its Conv2DTranspose needs no kernel flip either."""
    _, files, images, _ = seed_files
    np.save(tmp_path / "x.npy", images)
    code = textwrap.dedent(f"""
        import os; os.environ["KERAS_BACKEND"] = "tensorflow"
        import numpy as np, keras
        m = keras.saving.load_model({str(files["keras3_model_save.h5"])!r}, safe_mode=False, compile=False)
        np.save({str(tmp_path / "y.npy")!r}, np.asarray(m.predict(np.load({str(tmp_path / "x.npy")!r}), verbose=0)))
    """)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
    net = load_keras_weights(UNet(), files["keras3_model_save.h5"]).eval()
    with torch.no_grad():
        ours = torch.sigmoid(net(to_torch(images) / 255.0)).numpy().transpose(0, 2, 3, 1)
    assert np.abs(ours - np.load(tmp_path / "y.npy")).max() < 1e-5


def test_unet_from_keras_takes_the_files_shape(tmp_path):
    model = seed_model(32, channels=1)
    model.save(tmp_path / "grey.h5")
    net = unet_from_keras(tmp_path / "grey.h5")
    assert net.in_channels == 1 and net.out_channels == 1
    ref = conv_layers(model)[0].get_weights()[0]
    assert torch.equal(net.inc[0].weight, torch.from_numpy(ref).permute(3, 2, 0, 1))


# --- files that do not fit --------------------------------------------------------------------


def small_model(second_filters: int, tail=()):
    from keras.layers import Conv2D, Input
    from keras.models import Model

    inputs = Input((16, 16, 3))
    x = Conv2D(8, 3, padding="same", name="first")(inputs)
    x = Conv2D(second_filters, 3, padding="same", name="second")(x)
    for layer in tail:
        x = layer(x)
    return Model(inputs, x)


def test_wrong_topology_names_the_layer_and_the_file(tmp_path):
    path = tmp_path / "wide.h5"
    small_model(16).save(path)
    net = UNet()
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match=r"'second'.*wide\.h5.*expected kernel shape \(3, 3, 8, 8\), got \(3, 3, 8, 16\)"):
        load_keras_weights(net, path)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters())), "a failed import changed the UNet"


def test_too_few_layers_is_refused(tmp_path):
    path = tmp_path / "short.h5"
    small_model(8).save(path)
    with pytest.raises(ValueError, match=r"short\.h5 holds 2 convolution layers but the UNet has 23"):
        load_keras_weights(UNet(), path)


def test_non_convolution_layer_is_refused(tmp_path):
    from keras.layers import Dense

    path = tmp_path / "dense.h5"
    model = small_model(8, tail=[Dense(4, name="head_dense")])
    model.save(path)
    with pytest.raises(ValueError, match=r"'head_dense'.*not a 2-D convolution"):
        load_keras_weights(UNet(), path)
    model.save_weights(tmp_path / "dense.weights.h5")
    with pytest.raises(ValueError, match=r"'head_dense'.*not a Conv2D or Conv2DTranspose"):
        load_keras_weights(UNet(), tmp_path / "dense.weights.h5")


def test_weights_h5_orders_layers_by_class_position_not_by_name(tmp_path):
    """``.weights.h5`` keys layers conv2d, conv2d_1, ... in model order, whatever they are called."""
    from keras.layers import Conv2D, Conv2DTranspose, Input
    from keras.models import Model

    inputs = Input((16, 16, 3))
    x = Conv2D(8, 3, padding="same", name="zz_first")(inputs)
    x = Conv2DTranspose(4, 2, strides=2, name="aa_up")(x)
    x = Conv2D(2, 3, padding="same", name="mm_second")(x)
    path = tmp_path / "named.weights.h5"
    Model(inputs, x).save_weights(path)
    convs, ordered = read_keras_convs(path)
    assert not ordered
    assert [(c.name, c.transposed, c.kernel.shape) for c in convs] == [
        ("zz_first", False, (3, 3, 3, 8)), ("mm_second", False, (3, 3, 4, 2)), ("aa_up", True, (2, 2, 4, 8))
    ]


def test_not_a_keras_file(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(ValueError, match="not a Keras weights file"):
        load_keras_weights(UNet(), path)
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        load_keras_weights(UNet(), tmp_path / "missing.h5")


# --- L2: Keras' kernel_regularizer = our weight decay on the kernel group -------------------------


@pytest.fixture(scope="module")
def l2_start(tmp_path_factory):
    """The seed with l2(W) on every kernel (as the answer adds it), non-zero biases, a fixed batch."""
    path = tmp_path_factory.mktemp("l2") / "start.h5"
    model = seed_model(SIZE, l2=W)
    randomize_biases(model)
    model.save(path)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, SIZE, SIZE, 3)).astype("float32")
    y = (rng.random((4, SIZE, SIZE, 1)) > 0.7).astype("float32")
    return path, x, y


def keras_trained(l2_start, optimizer):
    """A fresh Keras model from the start weights, trained STEPS steps; returns (model, losses)."""
    path, x, y = l2_start
    model = seed_model(SIZE, l2=W)
    model.load_weights(path)
    model.compile(optimizer=optimizer, loss="binary_crossentropy")  # the seed's loss, on its sigmoid output
    losses = [float(model.train_on_batch(x, y)) for _ in range(STEPS)]
    return model, losses


def torch_trained(l2_start, name: str, lr: float, l2: float) -> UNet:
    path, x, y = l2_start
    net = load_keras_weights(UNet(), path)
    opt = build_optimizer(net, name, lr=lr, l2=l2)
    xt, yt = to_torch(x) / 255.0, to_torch(y)
    for _ in range(STEPS):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(net(xt), yt).backward()
        opt.step()
    return net


@pytest.fixture(scope="module")
def keras_adam(l2_start):
    return keras_trained(l2_start, keras.optimizers.Adam(learning_rate=1e-3, epsilon=1e-7))


def test_l2_gradient_is_data_gradient_plus_weight_decay_times_weight(l2_start):
    """d(Keras loss + sum of l2 penalties)/dp == our data gradient + group weight_decay * p, every p."""
    path, x, y = l2_start
    model = seed_model(SIZE, l2=W)
    model.load_weights(path)
    out = model(torch.from_numpy(x), training=True)
    total = keras.losses.binary_crossentropy(torch.from_numpy(y), out).mean() + sum(model.losses)
    variables = [v.value for layer in conv_layers(model) for v in (layer.kernel, layer.bias)]
    keras_grads = torch.autograd.grad(total, variables)

    net = load_keras_weights(UNet(), path)
    decay = {id(p): g["weight_decay"] for g in param_groups(net, 2 * W) for p in g["params"]}
    F.binary_cross_entropy_with_logits(net(to_torch(x) / 255.0), to_torch(y)).backward()
    ours = [p for m in torch_conv_layers(net) for p in (m.weight, m.bias)]
    assert len(ours) == len(keras_grads) == 46
    for p, g in zip(ours, keras_grads):
        g = g.permute(3, 2, 0, 1) if g.ndim == 4 else g
        total_grad = p.grad + decay[id(p)] * p.detach()
        rel = ((total_grad - g).abs().max() / g.abs().max()).item()
        assert rel < 1e-4, f"{tuple(p.shape)}: relative gradient error {rel:.2e}"


def test_adam_steps_follow_keras_l2(l2_start, keras_adam):
    model, _ = keras_adam
    net = torch_trained(l2_start, "adam", lr=1e-3, l2=W)
    assert max_rel_diff(model, net) < 1e-4  # measured 4.3e-5 after 5 steps (weights moved up to 5e-3)


def test_sgd_steps_follow_keras_l2(l2_start):
    model, _ = keras_trained(l2_start, keras.optimizers.SGD(learning_rate=0.05, momentum=0.9))
    net = torch_trained(l2_start, "sgd", lr=0.05, l2=W)
    assert max_rel_diff(model, net) < 1e-4


def test_adamw_with_the_same_number_is_a_different_regulariser(l2_start, keras_adam):
    model, _ = keras_adam
    adamw = max_rel_diff(model, torch_trained(l2_start, "adamw", lr=1e-3, l2=W))
    assert adamw > 1e-2  # measured 0.17: decoupled decay is not Keras' L2 under Adam


def test_litunet_trains_like_keras_and_reports_keras_loss(l2_start, keras_adam, tmp_path):
    """LitUNet(l2=W) through a Trainer: Keras' weights, and Keras' loss = train/loss + train/l2_penalty."""
    import lightning.pytorch as pl

    path, x, y = l2_start
    model, keras_losses = keras_adam
    lit = LitUNet(l2=W, img_size=SIZE)
    load_keras_weights(lit.unet, path)

    start = load_keras_weights(UNet(), path)  # Keras' first reported loss is at the start weights
    with torch.no_grad():
        first = F.binary_cross_entropy_with_logits(start(to_torch(x) / 255.0), to_torch(y)) + l2_penalty(start, W)
    assert abs(first.item() - keras_losses[0]) < 1e-5

    batch = {"image": to_torch(x).to(torch.uint8), "mask": to_torch(y).to(torch.uint8)}
    loader = torch.utils.data.DataLoader([batch] * STEPS, batch_size=None)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(lit, train_dataloaders=loader)
    assert max_rel_diff(model, lit.unet) < 1e-4

    m = trainer.callback_metrics  # epoch means over the STEPS steps, each at the weights before its update
    reported = (m["train/loss_epoch"] + m["train/l2_penalty"]).item()
    assert abs(reported - float(np.mean(keras_losses))) < 1e-5
    assert abs(m["train/loss_with_l2"].item() - reported) < 1e-6


def test_predict_cli_runs_the_notebooks_h5_like_the_same_weights_in_a_checkpoint(tmp_path):
    """`predict.py --keras-h5 model.h5` and `--ckpt` of the same weights write the same submission."""
    import lightning.pytorch as pl
    from pathlib import Path

    model = seed_model(128)
    randomize_biases(model)
    h5 = tmp_path / "model-dsbowl2018-1.h5"
    model.save(h5)
    lit = LitUNet(img_size=128)
    load_keras_weights(lit.unet, h5)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=0, logger=False, enable_checkpointing=False)
    trainer.strategy.connect(lit)
    trainer.save_checkpoint(tmp_path / "same.ckpt")
    sample = Path(__file__).resolve().parents[1] / "unet_pl" / "sample" / "stage1_train"
    images = tmp_path / "test"
    for d in sorted(sample.iterdir())[:3]:
        (images / d.name / "images").mkdir(parents=True)
        (images / d.name / "images" / f"{d.name}.png").write_bytes((d / "images" / f"{d.name}.png").read_bytes())
    outs = {}
    for flag, path in (("--keras-h5", h5), ("--ckpt", tmp_path / "same.ckpt")):
        outs[flag] = tmp_path / f"{flag.strip('-')}.csv"
        proc = subprocess.run([sys.executable, "-m", "unet_pl.cli.predict", flag, str(path), "--data-dir", str(images),
                               "--out", str(outs[flag]), "--gpus", "0", "--threshold", "0.3", "--no-progress"],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    rows = outs["--keras-h5"].read_text().splitlines()
    assert len(rows) >= 4 and rows == outs["--ckpt"].read_text().splitlines()
