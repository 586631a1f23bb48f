"""ADM checkpoint conversion is exact; conditional and latent UNets load (or are refused) clearly."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.backbone.adm import convert_adm_state_dict
from pipeline.backbone.loading import load_backbone
from pipeline.errors import ConfigError
from stages.cli import app
from tests.adm_reference import ADMUNet


def _reference(
    *, new_order: bool, num_classes: int | None, scale_shift: bool = True, mc=32, head_channels=16
) -> ADMUNet:
    torch.manual_seed(0)
    ref = ADMUNet(
        model_channels=mc,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        attention_ds=(2, 4),
        head_channels=head_channels,
        new_order=new_order,
        num_classes=num_classes,
        scale_shift=scale_shift,
    ).eval()
    with torch.no_grad():  # no zero-initialised layer may hide a wrong mapping
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref


def _max_diff(ref: ADMUNet, unet: torch.nn.Module, num_classes: int | None) -> float:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    t = torch.tensor([0, 731])
    y = torch.tensor([1, num_classes - 1]) if num_classes else None
    with torch.no_grad():
        return float((ref(x, t, y) - unet(x, t, class_labels=y).sample).abs().max())


CASES = [
    pytest.param(True, 10, True, id="new-order-class-cond"),
    pytest.param(False, None, True, id="legacy-order-uncond"),
    pytest.param(False, 7, False, id="legacy-no-scale-shift"),
]


class TestConversion:
    @pytest.mark.parametrize(("new_order", "classes", "scale_shift"), CASES)
    def test_outputs_equal_the_reference(self, new_order, classes, scale_shift):
        ref = _reference(new_order=new_order, num_classes=classes, scale_shift=scale_shift)
        flags = {"num_head_channels": 16, "use_new_attention_order": new_order}
        unet, _ = convert_adm_state_dict(ref.state_dict(), flags)
        assert unet.config.sample_size == 32
        assert unet.config.num_class_embeds == classes
        assert _max_diff(ref, unet.eval(), classes) < 1e-4

    @pytest.mark.parametrize("new_order", [True, False])
    def test_the_wrong_attention_order_is_detectably_wrong(self, new_order):
        ref = _reference(new_order=new_order, num_classes=None)
        flags = {"num_head_channels": 16, "use_new_attention_order": not new_order}
        unet, _ = convert_adm_state_dict(ref.state_dict(), flags)
        assert _max_diff(ref, unet.eval(), None) > 1e-2

    def test_every_tensor_is_consumed(self):
        state = _reference(new_order=True, num_classes=None).state_dict()
        state["input_blocks.1.0.extra.weight"] = torch.zeros(3)
        with pytest.raises(ConfigError, match=r"1 checkpoint tensors unused.*extra"):
            convert_adm_state_dict(state, {"num_head_channels": 16})

    def test_every_parameter_is_filled(self):
        state = _reference(new_order=True, num_classes=None).state_dict()
        del state["middle_block.1.norm.bias"]
        with pytest.raises(ConfigError, match=r"1 unfilled.*mid_block.attentions.0.group_norm"):
            convert_adm_state_dict(state, {"num_head_channels": 16})

    def test_not_a_checkpoint(self):
        with pytest.raises(ConfigError, match="not a guided-diffusion UNet"):
            convert_adm_state_dict({"weight": torch.zeros(1)}, {})


class TestCheckpointFiles:
    @pytest.mark.parametrize(
        ("name", "new_order", "classes", "schedule"),
        [
            ("64x64_diffusion.pt", True, 10, "squaredcos_cap_v2"),
            ("256x256_diffusion_uncond.pt", False, None, "linear"),
        ],
    )
    def test_released_names_use_their_presets(self, tmp_path, name, new_order, classes, schedule):
        ref = _reference(new_order=new_order, num_classes=classes, mc=64, head_channels=64)
        torch.save(ref.state_dict(), tmp_path / name)
        bb = load_backbone(str(tmp_path / name))
        assert bb.scheduler.config.beta_schedule == schedule
        assert bb.scheduler.config.variance_type == "learned_range"  # 6 output channels
        assert _max_diff(ref, bb.unet, classes) < 1e-4
        assert bb.site("up1.upsample").resolution == 32

    def test_side_car_flags(self, tmp_path):
        ref = _reference(new_order=False, num_classes=None)
        torch.save(ref.state_dict(), tmp_path / "mine.pt")
        (tmp_path / "mine.pt.json").write_text(
            json.dumps({"num_head_channels": 16, "use_new_attention_order": False})
        )
        assert _max_diff(ref, load_backbone(str(tmp_path / "mine.pt")).unet, None) < 1e-4

    def test_unknown_name_without_side_car_says_what_to_write(self, tmp_path):
        torch.save(_reference(new_order=False, num_classes=None).state_dict(), tmp_path / "x.pt")
        with pytest.raises(ConfigError, match=r"put its flags in x\.pt\.json"):
            load_backbone(str(tmp_path / "x.pt"))

    def test_layers_command_lists_a_checkpoint(self, runner, tmp_path):
        ref = _reference(new_order=True, num_classes=10, mc=64, head_channels=64)
        torch.save(ref.state_dict(), tmp_path / "64x64_diffusion.pt")
        result = runner.invoke(
            app, ["layers", "--backbone", str(tmp_path / "64x64_diffusion.pt"), "--json"]
        )
        assert result.exit_code == 0, result.output
        names = [row["name"] for row in json.loads(result.output)]
        assert names[0] == "mid" and "up1.attn2" in names


class TestConditionalUNets:
    def _save(self, path, in_channels: int = 3) -> None:
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        UNet2DConditionModel(
            sample_size=16,
            in_channels=in_channels,
            out_channels=in_channels,
            layers_per_block=1,
            block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=8,
            attention_head_dim=4,
            norm_num_groups=4,
        ).save_pretrained(path)

    def test_runs_with_an_empty_conditioning(self, tmp_path):
        self._save(tmp_path / "cond")
        bb = load_backbone(str(tmp_path / "cond"))
        assert bb.provenance()["conditioning"].startswith("empty")
        assert "up1.attn0" in [s.name for s in bb.sites]
        feats = bb.features(torch.zeros(2, 3, 16, 16), 0, ["up1.attn0"])
        assert feats["up1.attn0"].shape == (2, 16, 16, 16)

    def test_latent_unet_is_refused(self, tmp_path):
        self._save(tmp_path / "latent", in_channels=4)
        with pytest.raises(ConfigError, match="latent-space UNet needs its VAE"):
            load_backbone(str(tmp_path / "latent"))
