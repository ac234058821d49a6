"""Tiny, randomly initialised transformers detectors of every DETR-family architecture kdctl supports, for the
CUDA-path checks of ``gpu_suite.py`` (a copy of the acceptance checks' ``tiny_models.py`` builders, so that the
suite runs on a machine where only the repository travels).

``build(arch, names, small)`` -> a ``transformers`` model; ``small=False`` gives a slightly larger teacher."""
import torch  # noqa: F401  (the builders run under the caller's torch seed)

ARCHS = ("detr", "table-transformer", "rt_detr", "rt_detr_v2", "d_fine", "deimv2", "lw_detr", "rf_detr")


def resnet(small):
    sizes = [8, 16, 32, 64] if small else [16, 32, 64, 128]
    return {"model_type": "resnet", "embedding_size": sizes[0], "hidden_sizes": sizes, "depths": [1, 1, 1, 1],
            "layer_type": "basic"}


def hgnet(small):
    from transformers import HGNetV2Config
    w = 1 if small else 2
    return HGNetV2Config(embedding_size=8, stem_channels=[3, 8, 8], stage_in_channels=[8, 16 * w, 32 * w, 64 * w],
                         stage_mid_channels=[8, 8, 16, 16], stage_out_channels=[16 * w, 32 * w, 64 * w, 128 * w],
                         stage_num_blocks=[1, 1, 1, 1], stage_numb_of_layers=[1, 1, 1, 1],
                         hidden_sizes=[16 * w, 32 * w, 64 * w, 128 * w], depths=[1, 1, 1, 1],
                         out_features=["stage2", "stage3", "stage4"])


def build(arch, names, small):
    import transformers as T
    labels = dict(enumerate(names))
    d = 16 if small else 32
    layers = 2 if small else 3
    common = dict(id2label=labels, label2id={n: i for i, n in labels.items()})
    if arch in ("detr", "table-transformer"):
        cls = T.DetrConfig if arch == "detr" else T.TableTransformerConfig
        model = T.DetrForObjectDetection if arch == "detr" else T.TableTransformerForObjectDetection
        bb = {**resnet(small), "out_features": ["stage4"]}
        c = cls(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=bb, d_model=d,
                encoder_layers=1, decoder_layers=layers, encoder_ffn_dim=2 * d, decoder_ffn_dim=2 * d,
                encoder_attention_heads=2, decoder_attention_heads=2, num_queries=10, **common)
        return model(c)
    if arch in ("rt_detr", "rt_detr_v2"):
        bb = T.RTDetrResNetConfig(**{k: v for k, v in resnet(small).items() if k != "model_type"},
                                  out_features=["stage2", "stage3", "stage4"])
        chans = bb.hidden_sizes[1:]
        cls, model = ((T.RTDetrConfig, T.RTDetrForObjectDetection) if arch == "rt_detr"
                      else (T.RTDetrV2Config, T.RTDetrV2ForObjectDetection))
        c = cls(backbone_config=bb, encoder_in_channels=chans, encoder_hidden_dim=d, d_model=d,
                decoder_in_channels=[d, d, d], encoder_ffn_dim=2 * d, decoder_ffn_dim=2 * d, encoder_attention_heads=2,
                decoder_attention_heads=2, decoder_layers=layers, num_queries=10, num_denoising=4,
                use_pretrained_backbone=False, **common)
        return model(c)
    if arch in ("d_fine", "deimv2"):
        hg = hgnet(small)
        cls, model = ((T.DFineConfig, T.DFineForObjectDetection) if arch == "d_fine"
                      else (T.Deimv2Config, T.Deimv2ForObjectDetection))
        c = cls(backbone_config=hg, encoder_in_channels=hg.hidden_sizes[1:], encoder_hidden_dim=d, d_model=d,
                decoder_in_channels=[d, d, d], encoder_ffn_dim=2 * d, decoder_ffn_dim=2 * d, encoder_attention_heads=2,
                decoder_attention_heads=2, decoder_layers=layers + 1, num_queries=10, num_denoising=4, max_num_bins=8,
                lqe_hidden_dim=8, hidden_expansion=0.5, **common)
        return model(c)
    if arch in ("lw_detr", "rf_detr"):
        if arch == "lw_detr":
            vit = T.LwDetrViTConfig(hidden_size=d, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                                    pretrain_image_size=64, patch_size=16, num_windows=1, out_indices=[1, 2])
            c = T.LwDetrConfig(backbone_config=vit, projector_scale_factors=[1.0], d_model=d, decoder_ffn_dim=2 * d,
                               decoder_layers=layers, decoder_self_attention_heads=2, decoder_cross_attention_heads=2,
                               num_queries=10, group_detr=3, **common)
            return T.LwDetrForObjectDetection(c)
        c = T.RfDetrConfig(**common)
        bbc = c.backbone_config
        for k, v in dict(hidden_size=d * 2, num_hidden_layers=2, num_attention_heads=2, intermediate_size=4 * d,
                         image_size=64, patch_size=16).items():
            if hasattr(bbc, k):
                setattr(bbc, k, v)
        if hasattr(bbc, "out_indices"):
            bbc.out_indices = [1, 2]
        c.d_model, c.decoder_layers, c.num_queries, c.group_detr = d, layers, 10, 3
        for k in ("decoder_ffn_dim",):
            if hasattr(c, k):
                setattr(c, k, 2 * d)
        return T.RfDetrForObjectDetection(c)
    raise SystemExit(f"unknown architecture {arch}")
