"""Test helpers: a padded batch and saving a tiny model (real-time DETR tests), a tiny DETR checkpoint."""

import torch

from kdctl.data.batch import Batch


def padded_batch(n: int = 2) -> Batch:
    """``n`` (<= 3) images of sizes 128x96, 80x128, 128x128 padded to 128x128, two boxes each (labels 0 and 2)."""
    g = torch.Generator().manual_seed(0)
    sizes = [(128, 96), (80, 128), (128, 128)][:n]
    images = torch.zeros(n, 3, 128, 128)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.rand(3, h, w, generator=g)
    targets = [{"boxes": torch.tensor([[10.0, 12, 50, 60], [30, 40, 90, 70]]), "labels": torch.tensor([0, 2])}] * n
    return Batch(images=images, sizes=sizes, orig_sizes=[(2 * h, 2 * w) for h, w in sizes], targets=targets)


def save_tiny(model: torch.nn.Module, out, rich: bool = False) -> str:
    """``model.save_pretrained(out)``; ``rich``: first redraw every weight matrix N(0, 1 / fan_in) (random inits
    whose outputs do not tie)."""
    if rich:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 1.0 / p[0].numel() ** 0.5)
    model.save_pretrained(out)
    return str(out)


def save_tiny_detr(out, names, *, widths=(8, 16, 16, 32), d_model: int = 16, decoder_layers: int = 1,
                   ffn: int = 16, num_queries: int = 8, seed: int = 0, jitter: float = 0.0, **config) -> str:
    """A tiny DETR (ResNet backbone of ``widths``, one encoder layer, 2 heads) for ``names``, saved with
    ``save_pretrained``: what a hub DETR checkpoint looks like on disk. ``jitter``: add N(0, jitter) to every weight
    after the init (distinct boxes and scores per query); ``config``: more DetrConfig values."""
    import transformers

    backbone = {"model_type": "resnet", "depths": [1, 1, 1, 1], "hidden_sizes": list(widths),
                "embedding_size": widths[0], "out_features": ["stage4"], **config.pop("backbone", {})}
    cfg = transformers.DetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone, d_model=d_model,
        encoder_layers=1, decoder_layers=decoder_layers, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, num_queries=num_queries, id2label=dict(enumerate(names)), **config)
    torch.manual_seed(seed)
    model = transformers.DetrForObjectDetection(cfg)
    if jitter:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(jitter * torch.randn_like(p))
    model.save_pretrained(out)
    return str(out)


def assert_final_layer_is_output(det, batch: Batch) -> None:
    """In eval mode the last decoder layer of ``det.forward_taps`` is the model's own output (logits and boxes)."""
    with torch.no_grad():
        det.eval()
        out = det.model(*det.pixel_inputs(batch))
        taps = det.forward_taps(batch)
    assert torch.allclose(taps["logits"][-1], out.logits, atol=1e-6)
    assert torch.allclose(taps["boxes"][-1], out.pred_boxes, atol=1e-6)


def assert_onnx_dynamic_batch(det, path) -> None:
    """The exported graph (``pixel_values`` only, square 128 px input) computes the model's logits and boxes at
    another batch size (3) within 1e-4; queries whose encoder score ties another position's are left out
    (onnxruntime may break the tie differently), and at least 10 are compared."""
    import onnxruntime as ort

    from kdctl.models.detr import onnx as detr_onnx

    det.eval()
    meta, _ = detr_onnx.export_onnx(det, path, 128, 17)
    assert [i["name"] for i in meta["inputs"]] == ["pixel_values"]
    x = torch.rand(3, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    got = ort.InferenceSession(str(path)).run(None, {"pixel_values": x.numpy()})
    keep = detr_onnx.comparable_queries(det, {"pixel_values": x})
    with torch.no_grad():
        ref = det.model(pixel_values=x)
    assert int(keep.sum()) >= 10
    for g, r in zip(got, (ref.logits, ref.pred_boxes), strict=True):
        assert float((torch.from_numpy(g)[keep] - r[keep]).abs().max()) < 1e-4


def decode_own_queries(det, train: bool) -> tuple[dict, dict]:
    """``(taps, decoded)``: ``det``'s taps on :func:`padded_batch` (training or eval mode) and its decoder run again
    on its own queries (content at its own top-k memory positions), without gradients."""
    det.train(train)
    b = padded_batch()
    with torch.no_grad():
        taps = det.forward_train(b).taps if train else det.forward_taps(b)
        return taps, det.decode(taps, taps["queries"], memory_index=taps["query_index"])
