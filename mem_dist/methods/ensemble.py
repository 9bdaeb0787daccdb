"""The surrogate(s) MEM optimises against: one open_clip CLIP, or several (``surrogate.ensemble``).

An :class:`Ensemble` owns its members (model, optimizer, pixel spec), trains them on the
same batches (the surrogate phase, DDP across ranks), and gives PGD and HotFlip the
members' mean per-pair loss. The rounds loop (:mod:`mem_dist.pipeline.engine`) sees only this.

Shapes: B batch, k trigger length, L context length, E embedding dim, H/W canvas side,
C = 3. Pixels are float [B, C, H, W] in [0, 255] units.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from mem_dist.pipeline import augment, distributed, surrogate, towers
from mem_dist.methods import hotflip
from mem_dist.pipeline.config import RunConfig, seed_of
from mem_dist.pipeline.config_io import ConfigError

MAX_TEXT_BATCH = 4096
"""HotFlip scores a position's candidates for the whole batch in forwards of at most this many sequences."""


@dataclass
class Member:
    """One surrogate: the first is surrogate.model / pretrained, the rest surrogate.ensemble."""

    model: torch.nn.Module  # DDP-wrapped when world > 1
    optimizer: torch.optim.Optimizer
    spec: surrogate.PixelSpec
    folded: Callable[[torch.Tensor], torch.Tensor] | None = None  # the sample phase's image tower; None: make it anew

    @property
    def bare(self) -> torch.nn.Module:
        return surrogate.unwrap(self.model)

    def encode_image(self, model_input: torch.Tensor) -> torch.Tensor:
        """The image features; in eval mode (the sample phase) through a copy of the tower
        with its BatchNorms folded (:func:`towers.fold_batchnorm`, RN towers), made on first
        use after :meth:`Ensemble.weights_changed`."""
        if self.bare.training:
            return self.bare.encode_image(model_input)
        if self.folded is None:
            self.folded = towers.fold_batchnorm(getattr(self.bare, "visual", None)) or self.bare.encode_image
        return self.folded(model_input)


class Ensemble:
    """The surrogate(s) of a run, identical on every rank."""

    def __init__(self, members: list[Member], tokenizer, device: torch.device, precision: str):
        self.members, self.tokenizer, self.device, self.precision = members, tokenizer, device, precision

    @classmethod
    def create(cls, cfg: RunConfig, dist: distributed.Dist) -> "Ensemble":
        """Every member from the same seed on every rank (the first from ``cfg.seed``), with its
        AdamW; DDP-wrapped when there are several ranks."""
        wanted = [(cfg.surrogate.model, cfg.surrogate.pretrained)]
        wanted += [(m.model or cfg.surrogate.model, m.pretrained) for m in cfg.surrogate.ensemble]
        members, tokenizer = [], None
        for i, (name, weights) in enumerate(wanted):
            key = "surrogate" if i == 0 else f"surrogate.ensemble[{i - 1}]"
            torch.manual_seed(cfg.seed if i == 0 else seed_of(cfg.seed, "member", i))  # identical init on every rank
            model, tok, spec = surrogate.create_surrogate(name, weights, device=dist.device, key=key)
            if tokenizer is None:
                tokenizer = tok
            elif not surrogate.same_tokenizer(tok, tokenizer):
                raise ConfigError(f"config key '{key}.model': {name} tokenizes differently from surrogate.model "
                                  f"({cfg.surrogate.model}); every member must share one tokenizer (the trigger is one text)")
            optimizer = surrogate.adamw(model, cfg.mem.lr, cfg.mem.weight_decay)
            if dist.world > 1:
                model, optimizer = dist.accelerator.prepare(model, optimizer)
            model.eval()  # train mode only inside the surrogate phase (BatchNorm in RN surrogates)
            members.append(Member(model, optimizer, spec))
        return cls(members, tokenizer, dist.device, cfg.surrogate.precision)

    def __len__(self) -> int:
        return len(self.members)

    def autocast(self):
        """bf16 / fp16 autocast on CUDA as surrogate.precision asks; fp32 (a no-op) otherwise."""
        if self.device.type != "cuda" or self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    # ----------------------------------------------------------------------------------
    # Losses
    # ----------------------------------------------------------------------------------

    def _images(self, member: Member, pix_BCHW: torch.Tensor, crop_gen: torch.Generator | None) -> torch.Tensor:
        if crop_gen is not None:
            pix_BCHW = augment.random_resized_crop(pix_BCHW, crop_gen)
        with self.autocast():
            return member.encode_image(surrogate.to_model_input(pix_BCHW, member.spec)).float()

    def _texts(self, member: Member, tok_BL: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return member.bare.encode_text(tok_BL).float()

    def pair_losses(self, pix_BCHW: torch.Tensor, tok_BL: torch.Tensor, crop: Callable[[], torch.Generator | None] = lambda: None
                    ) -> torch.Tensor:
        """Per-pair losses [B] averaged over the members: what PGD minimises (gradient to the
        pixels only; the text towers run without one) and the round metrics report.
        ``crop()`` gives each member's crop generator (``experimental.mem.augment``) or None."""
        losses = []
        for m in self.members:
            image = self._images(m, pix_BCHW, crop())
            with torch.no_grad():
                text = self._texts(m, tok_BL)
            losses.append(surrogate.clip_loss(image, text, m.bare.logit_scale))
        return torch.stack(losses).mean(0)

    def train(self) -> None:
        self.weights_changed()  # they will
        for m in self.members:
            m.model.train()

    def eval(self) -> None:
        for m in self.members:
            m.model.eval()

    def train_step(self, pix_BCHW: torch.Tensor, tok_BL: torch.Tensor, crop_gen: torch.Generator | None,
                   step: bool = True) -> list[float]:
        """One AdamW step of every member on the batch, through its DDP wrapper (gradients
        all-reduced across ranks); returns each member's loss. ``step=False``: the batch's
        gradients only added to each member's .grad, through the bare model (no DDP): the
        caller sums several ranks' batches and steps (:func:`mem_dist.methods.mem.rounds.surrogate_phase`)."""
        losses = []
        for m in self.members:
            pix = augment.random_resized_crop(pix_BCHW, crop_gen) if crop_gen is not None else pix_BCHW
            with self.autocast():
                out = (m.model if step else m.bare)(surrogate.to_model_input(pix, m.spec), tok_BL)
            image, text = (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
            loss = surrogate.clip_loss(image.float(), text.float(), m.bare.logit_scale).mean()
            if step:
                m.optimizer.zero_grad(set_to_none=True)  # the original never zeroed them (bug 4)
            loss.backward()
            if step:
                m.optimizer.step()
            losses.append(loss.item())
        return losses

    # ----------------------------------------------------------------------------------
    # HotFlip
    # ----------------------------------------------------------------------------------

    def hotflip(self, pix_BCHW: torch.Tensor, trig_Bk: torch.Tensor, assemble: Callable[[torch.Tensor], torch.Tensor],
                vocab: torch.Tensor, n_candidates: int) -> torch.Tensor:
        """One HotFlip update of the batch's triggers against their true captions (the members'
        mean loss). ``assemble(trig [r*B, k])`` gives the token matrix [r*B, L] of each trigger
        with its sample's caption (the batch's captions repeated r times)."""
        k = trig_Bk.shape[1]
        ids = assemble(trig_Bk)
        images, grads, embeds, scales = [], [], [], []
        for m in self.members:
            model = m.bare
            with torch.no_grad(), self.autocast():
                image = F.normalize(m.encode_image(surrogate.to_model_input(pix_BCHW, m.spec)).float(), dim=-1)
            emb = surrogate.text_tower(model).token_embedding(ids).detach().requires_grad_(True)
            with self.autocast():
                txt = surrogate.encode_text_from_embeds(model, emb, ids)
            loss = surrogate.clip_loss(image, txt.float(), model.logit_scale).mean()
            (grad,) = torch.autograd.grad(loss, emb)
            images.append(image)
            grads.append(grad[:, 1:1 + k])
            embeds.append(surrogate.token_embedding_weight(model).detach())
            scales.append(model.logit_scale)
        cands = hotflip.candidate_tokens(grads, embeds, vocab, n_candidates)

        def text_features(t_Nk: torch.Tensor) -> list[torch.Tensor]:
            tok = assemble(t_Nk)
            out = [[] for _ in self.members]
            for start in range(0, len(tok), MAX_TEXT_BATCH):
                with self.autocast():
                    for i, m in enumerate(self.members):
                        out[i].append(F.normalize(m.bare.encode_text(tok[start:start + MAX_TEXT_BATCH]).float(), dim=-1))
            return [torch.cat(o) for o in out]

        new_trig, _ = hotflip.select_triggers(text_features, images, trig_Bk, cands, scales)
        return new_trig

    # ----------------------------------------------------------------------------------
    # Keeping ranks in step; checkpoints
    # ----------------------------------------------------------------------------------

    def sync_and_check(self, dist: distributed.Dist, round_: int) -> None:
        """Rank 0's buffers (BatchNorm statistics) to every rank, then a checksum of every
        member compared across ranks; raises if the ranks' surrogates differ."""
        for m in self.members:
            distributed.broadcast_buffers(m.bare, dist)
        self.weights_changed()
        sums = dist.gather(tuple(distributed.checksum(m.bare) for m in self.members))
        if len(set(sums)) != 1:
            raise RuntimeError(f"round {round_}: the surrogate differs across ranks (parameter checksums {sums}); "
                               f"DDP did not keep the ranks in step")

    def state_dict(self) -> dict:
        """The first member as "model" / "optimizer" (the layout from before ensembles, so older
        runs still resume), the others under "ensemble"."""
        first, rest = self.members[0], self.members[1:]
        return {"model": first.bare.state_dict(), "optimizer": first.optimizer.state_dict(),
                "ensemble": [{"model": m.bare.state_dict(), "optimizer": m.optimizer.state_dict()} for m in rest]}

    def load_state_dict(self, ck: dict) -> None:
        for member, saved in zip(self.members, [ck] + ck.get("ensemble", []), strict=True):
            member.bare.load_state_dict(saved["model"])
            member.optimizer.load_state_dict(saved["optimizer"])
        self.weights_changed()

    def weights_changed(self) -> None:
        """Drop the members' folded image towers (:meth:`Member.encode_image`): every change of
        weights or BatchNorm statistics (training, a loaded checkpoint, rank 0's buffers) comes
        through :meth:`train`, :meth:`load_state_dict` or :meth:`sync_and_check`, which call this."""
        for m in self.members:
            m.folded = None
