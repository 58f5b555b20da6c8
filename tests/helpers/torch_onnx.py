"""Fresh PyTorch models exported as users export them: ONNX (torch.onnx.export, the dynamo exporter), QDQ int8 by
onnxruntime.quantization.quantize_static (its defaults: uint8 activations, per-tensor int8 weights; and int8
activations with per-channel weights), and `.pt2` archives (torch.export.save)."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn


class Cnn(nn.Module):
    """Conv + batch norm + ReLU, max pool, a strided conv, global mean, linear."""

    shape = (1, 3, 16, 16)

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.fc = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.Linear(16, 5)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.b1(self.c1(x))), 2)
        return self.fc(torch.relu(self.c2(x)).mean((2, 3)))


class Separable(nn.Module):
    """MobileNet's pieces: depthwise + pointwise convolutions with ReLU6, strided, flattened into a classifier."""

    shape = (1, 1, 16, 16)

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.dw, self.pw = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 1)
        self.dw2, self.pw2 = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16), nn.Conv2d(16, 24, 1)
        self.fc = nn.Linear(24 * 4 * 4, 4)

    def forward(self, x):
        for layer in (self.c0, self.dw, self.pw, self.dw2):
            x = nn.functional.relu6(layer(x))
        x = torch.flatten(torch.relu(self.pw2(x)), 1)
        return torch.softmax(self.fc(x), -1)


class Mlp(nn.Module):
    shape = (1, 20)

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(20, 32), nn.Linear(32, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.relu(self.a(x)))))


class Conv1dNet(nn.Module):
    """A sensor-style 1-D network: two 1-D convolutions (one dilated), average pooling, a concatenation of two
    branches, sigmoid."""

    shape = (1, 4, 32)

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv1d(4, 8, 5, padding=2), nn.Conv1d(8, 8, 3, padding=2, dilation=2)
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        x = torch.relu(self.a(x))
        y = torch.relu(self.b(x))
        z = torch.cat([nn.functional.avg_pool1d(x, 2), nn.functional.avg_pool1d(y, 2)], dim=1)
        return torch.sigmoid(self.fc(z.mean(-1)))


class Transformer(nn.Module):
    """A small vision transformer: 4x4 patches, a learned position embedding, one pre-norm encoder block
    (LayerNorm, 4-head self-attention, a GELU MLP), mean over tokens, a linear head."""

    shape = (1, 1, 16, 16)

    def __init__(self, dim: int = 16):
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.1)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        y = self.ln1(x)
        x = x + self.attention(y, y, y, need_weights=False)[0]
        x = x + self.mlp(self.ln2(x))
        return self.head(x.mean(1))


class Recurrent(nn.Module):
    """A sequence model: an LSTM then a GRU over 12 steps (batch first), a linear head on the GRU's last state."""

    shape = (1, 12, 6)

    def __init__(self):
        super().__init__()
        self.lstm, self.gru, self.fc = nn.LSTM(6, 10, batch_first=True), nn.GRU(10, 8, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        y, _ = self.lstm(x)
        _, h = self.gru(y)
        return self.fc(h[-1])


class Upsampler(nn.Module):
    """A decoder's pieces: a transposed convolution (stride 2, padding 1, output padding 1), PixelShuffle."""

    shape = (1, 3, 6, 6)

    def __init__(self):
        super().__init__()
        self.up, self.conv = nn.ConvTranspose2d(3, 6, 3, stride=2, padding=1, output_padding=1), nn.Conv2d(6, 8, 3)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x):
        return self.shuffle(self.conv(torch.relu(self.up(x))))


class Norms(nn.Module):
    """GroupNorm with SiLU, InstanceNorm with PReLU (one slope per channel)."""

    shape = (1, 3, 10, 10)

    def __init__(self):
        super().__init__()
        self.a, self.gn = nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8)
        self.b, self.inorm, self.prelu = nn.Conv2d(8, 6, 3), nn.InstanceNorm2d(6, affine=True), nn.PReLU(6)

    def forward(self, x):
        return self.prelu(self.inorm(self.b(nn.functional.silu(self.gn(self.a(x))))))


class Activations(nn.Module):
    """Softplus, Hardsigmoid, Mish, ELU between linear layers."""

    shape = (2, 8)

    def __init__(self):
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.acts = [nn.Softplus(), nn.Hardsigmoid(), nn.Mish(), nn.ELU()]

    def forward(self, x):
        for fc, act in zip(self.fcs, self.acts):
            x = act(fc(x) * 3)
        return x


ARCHITECTURES = {"cnn": Cnn, "separable": Separable, "mlp": Mlp, "conv1d": Conv1dNet, "transformer": Transformer,
                 "recurrent": Recurrent, "upsampler": Upsampler, "norms": Norms, "activations": Activations}


def _model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = ARCHITECTURES[name]().eval()
    for m in model.modules():  # statistics a trained network has, so the folded batch norm does something
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model


def export_onnx(name: str, path: Path, seed: int = 0) -> Path:
    model = _model(name, seed)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(*model.shape),), str(path), dynamo=True, external_data=False,
                          input_names=["x"], output_names=["y"])
    return path


def export_onnx_torchscript(name: str, path: Path, seed: int = 0) -> Path:
    """The TorchScript exporter (torch.onnx.export(dynamo=False), opset 17), as many projects still export: shapes
    computed at run time (Shape, Gather, Cast), GELU spelled with Erf."""
    model = _model(name, seed)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(*model.shape),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])
    return path


def export_pt2(name: str, path: Path, seed: int = 0) -> Path:
    model = _model(name, seed)
    torch.export.save(torch.export.export(model, (torch.randn(*model.shape),)), str(path))
    return path


def quantize_qdq(float_path: Path, path: Path, signed: bool = False, samples: int = 16, seed: int = 1) -> Path:
    """onnxruntime's static quantization in QDQ form, calibrated on random inputs: its defaults (uint8 activations,
    per-tensor weights) or, `signed`, int8 activations with per-channel weights."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    graph_input = onnx.load(str(float_path)).graph.input[0]
    shape = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    rng = np.random.default_rng(seed)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{graph_input.name: rng.standard_normal(shape).astype(np.float32)}
                                 for _ in range(samples)])

        def get_next(self):
            return next(self.batches, None)

    extra = {"activation_type": QuantType.QInt8, "weight_type": QuantType.QInt8, "per_channel": True} if signed else {}
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(str(float_path), str(path), Reader(), quant_format=QuantFormat.QDQ, **extra)
    return path


def export_pt2e(name: str, path: Path, samples: int = 16, seed: int = 0) -> Path:
    """The architecture quantized as ExecuTorch's backends quantize (PT2E: torchao's prepare_pt2e/convert_pt2e
    with the XNNPACK quantizer's symmetric per-channel int8 configuration), calibrated on random inputs, saved as
    a .pt2."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer, get_symmetric_quantization_config

    model = _model(name, seed)
    example = (torch.randn(*model.shape),)
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(torch.export.export(model, example).module(), quantizer)
    rng = torch.Generator().manual_seed(seed + 1)
    for _ in range(samples):
        prepared(torch.randn(*model.shape, generator=rng))
    torch.export.save(torch.export.export(convert_pt2e(prepared), example), str(path))
    return path
