"""The Universal KSampler and the SAMPLER node for SamplerCustom / SamplerCustomAdvanced."""
from __future__ import annotations

import comfy.sample
import comfy.samplers
import comfy.utils

from ..guidance import Guidance, Settings
from ..guidance.sampler import OPTIMIZERS, SCHEDULES, STRENGTH_MODES
from . import comfy_bridge, memory_plan, run_report, validation
from .errors import GuidanceInputError
from .guidance_nodes import window_problem
from .validation import CheckedNode

CATEGORY = "sampling/universal guidance"

# The guidance knobs shared by both sampler nodes, in widget order. Tooltips say in words what a knob does, a
# typical range and which way to turn it; the formulas are in docs/nodes.md, 'Guidance knobs'.
MATHS = " Formulas: docs/nodes.md, 'Guidance knobs'."
GUIDANCE_KNOBS = {
    "forward_strength": ("FLOAT", {
        "default": 1.0, "min": 0.0, "max": 1.0e6, "step": 0.01,
        "tooltip": "How hard each guided step pulls the image towards the guidance targets. Raise it when the "
                   "result ignores the target; lower it when the image breaks up (noise, burnt colours). "
                   "'paper' mode: 1 with the example workflows' weights (the loss nodes' weight multiplies it). "
                   "'normalized' mode: a fraction of the step's noise, 0.05–0.5. 0 = no forward guidance."
                   + MATHS}),
    "recurrence": ("INT", {
        "default": 1, "min": 1, "max": 100,
        "tooltip": "How many times each guided step is repeated, adding the step's noise back in between, so "
                   "that the guidance takes hold without breaking the image. 1 = off; the paper uses 2–10 (more "
                   "for strong targets such as segmentation maps). Each guided step costs this many times "
                   "more."}),
    "backward_steps": ("INT", {
        "default": 0, "min": 0, "max": 200,
        "tooltip": "Extra optimization steps per guided step that adjust the predicted clean image directly "
                   "towards the target (backward guidance). 0 = off; 1–10 typical: more = closer to the target, "
                   "slower. Each costs one VAE decode plus one guidance-network pass, forward and backward."}),
    "backward_lr": ("FLOAT", {
        "default": 0.1, "min": 0.0, "max": 100.0, "step": 0.001,
        "tooltip": "Step size of the backward steps, in latent units (with adam: about how much each latent "
                   "value may change per step). 0.01–0.5 typical; raise it when backward steps change "
                   "nothing."}),
    "start_percent": ("FLOAT", {
        "default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
        "tooltip": "Guide only from this fraction of the run's steps on (0 = first step)."}),
    "end_percent": ("FLOAT", {
        "default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
        "tooltip": "Stop guiding at this fraction of the run's steps (1 = guide to the end). Steps outside "
                   "[start, end) are plain DDIM steps with no extra cost."}),
}
# The daily knob after the window: the widgets of the samplers end with it (its position is the one it had when
# the expert knobs were widgets of the samplers too; the frontend restores widget values by position).
MODE_KNOB = {
    "strength_mode": (list(STRENGTH_MODES), {
        "default": "paper",
        "tooltip": "What forward_strength measures. 'paper': the paper's unit (the weights of each loss node "
                   "are tuned for it). 'normalized': a fraction of the step's noise, so one setting (0.05–0.5) "
                   "works for any loss. 'polyak' (Shen et al. 2024): longer steps where the loss is flat, "
                   "forward_strength 0.001–2. 'polyak_loss': the step that would reach the loss's minimum, "
                   "forward_strength about 1." + MATHS}),
}
# The expert knobs: inputs of the 'UG Sampler Options' node, in the order they had as the samplers' last widgets
# in earlier releases (LEGACY_LAYOUT reads old widget values by that order).
EXPERT_KNOBS = {
    "schedule": (list(SCHEDULES), {
        "default": "constant",
        "tooltip": "How the forward strength changes across the guidance window: constant, or fading from full "
                   "strength to 0 (linear or cosine), which lets the last guided steps settle the details."}),
    "backward_optimizer": (list(OPTIMIZERS), {
        "default": "adam", "tooltip": "How the backward steps move: 'adam' (steady, step size ≈ backward_lr), "
                                      "'sgd' (plain gradient steps), or 'polyak' (step size from how far the "
                                      "loss is above its minimum)." + MATHS}),
    "backward_early_stop": ("FLOAT", {
        "default": 0.0, "min": 0.0, "max": 1.0e6, "step": 0.001,
        "tooltip": "Stop an image's backward steps early once its guidance loss is below this value (in the "
                   "loss's own units, as the run report shows it). 0 = always run all of them."}),
    "jacobian": ("BOOLEAN", {
        "default": True,
        "tooltip": "On (as in the paper): the guidance gradient passes through the diffusion model. Off: it "
                   "stops at the predicted clean image, about half the cost per guided step and often "
                   "enough for image-space losses. Self-guidance needs it on."}),
    "smoothing": ("FLOAT", {
        "default": 0.0, "min": 0.0, "max": 10.0, "step": 0.001,
        "tooltip": "Scores the decoded image on noisy copies (noise of this size, in image units 0–1, shrinking "
                   "as sampling goes on), which smooths out adversarial gradients (TFG's implicit dynamics). "
                   "0 = off; 0.05–0.3 typical, with smoothing_samples > 0." + MATHS}),
    "smoothing_samples": ("INT", {
        "default": 0, "min": 0, "max": 64,
        "tooltip": "How many noisy copies the smoothing scores (each costs one guidance-network pass, not a "
                   "decode). 0 = off; 4–16 typical."}),
    "smoothing_reduction": (["mean", "logmeanexp"], {
        "default": "mean",
        "tooltip": "How the noisy copies' losses combine: 'mean' (average), or 'logmeanexp' (TFG's choice, "
                   "dominated by the copies that already score well)."}),
    "max_step": ("FLOAT", {
        "default": 10.0, "min": 0.0, "max": 1.0e6, "step": 0.1,
        "tooltip": "Safety cap on one forward-guidance update, in multiples of the step's noise: no strength "
                   "can push the latent beyond what the VAE can decode (capped updates are counted in the run "
                   "report). 10 rarely binds; lower it if images turn black or burnt. 0 = no cap."}),
    "guidance_vae": ("VAE", {
        "tooltip": "Optional cheaper VAE that decodes the clean prediction for the guidance networks only, e.g. "
                   "Load VAE → taesd / taesdxl / taesd3 / taef1 (files in models/vae_approx): ~18× fewer FLOPs than "
                   "the SD VAE decoder per decode, but TAESD 'fudges fine details', so detail-level losses (faces) "
                   "see a softer image. The output latent is unchanged; decode it with the full VAE as usual."}),
    "cfg_branch": (["combined", "cond", "uncond"], {
        "default": "combined",
        "tooltip": "Which half of classifier-free guidance the guidance gradient passes through: 'combined' (the "
                   "paper), or only 'cond' / 'uncond' (less backward work; the paper's detection script used "
                   "'uncond'). At cfg 1 there is no unconditional half: 'uncond' then uses the conditional one "
                   "and the run report says so."}),
    "low_memory": (memory_plan.LOW_MEMORY_CHOICES, {
        "default": "auto",
        "tooltip": "Recompute the denoiser's block activations (UNet blocks; SD3 and Flux transformer blocks) and "
                   "the decoder's during the guided backward pass instead of keeping them (activation "
                   "checkpointing): much less memory, about one extra forward per guided iteration, same gradient. "
                   "With fp8 weights or a partly loaded model, the weights cast per layer are not kept either. "
                   "auto: on only where the run's estimate does not fit in the device's free memory (the run's "
                   "summary says which, with the figures); on / off: always / never."}),
}
GUIDANCE_INPUTS = {
    "vae": ("VAE", {"tooltip": "VAE used to decode the clean prediction for the guidance networks (the one "
                               "that matches the model)."}),
    "guidance": ("UG_GUIDANCE", {"tooltip": "Guidance terms, from one or more chained Universal Guidance "
                                            "loss nodes (e.g. Image Guidance)."}),
}


def options_from(node: str, **kw) -> comfy_bridge.RunOptions:
    try:
        return comfy_bridge.RunOptions(guidance_vae=kw.get("guidance_vae"), cfg_branch=kw.get("cfg_branch", "combined"),
                                       low_memory=kw.get("low_memory", "auto"))
    except ValueError as e:
        raise GuidanceInputError(f"{node}: {e}") from None


def settings_from(node: str, **kw) -> Settings:
    try:
        return Settings(
            forward_strength=kw["forward_strength"], recurrence=kw["recurrence"],
            backward_steps=kw["backward_steps"], backward_lr=kw["backward_lr"],
            start_percent=kw["start_percent"], end_percent=kw["end_percent"],
            strength_mode=kw.get("strength_mode", "paper"), schedule=kw.get("schedule", "constant"),
            backward_optimizer=kw.get("backward_optimizer", "adam"),
            backward_early_stop=kw.get("backward_early_stop", 0.0), jacobian=kw.get("jacobian", True),
            smoothing=kw.get("smoothing", 0.0), smoothing_samples=kw.get("smoothing_samples", 0),
            smoothing_reduction=kw.get("smoothing_reduction", "mean"), max_step=kw.get("max_step", 10.0))
    except ValueError as e:
        raise GuidanceInputError(f"{node}: {e}") from None


def knob_problems(values: dict) -> list:
    """The sampler knobs' own rules (each value already passed its type and range check, or is None)."""
    start, end = values.get("start_percent"), values.get("end_percent")
    steps, lr = values.get("backward_steps"), values.get("backward_lr")
    problems = [window_problem(start, end)]
    if steps and lr is not None and not lr > 0:
        problems.append(f"input 'backward_lr': must be > 0 when backward_steps is {steps} (0 turns backward "
                        f"guidance off)")
    return problems


def check_guidance(node: str, guidance) -> Guidance:
    if not isinstance(guidance, Guidance) or len(guidance) == 0:
        raise GuidanceInputError(
            f"{node}: input 'guidance' holds no guidance term. Connect a Universal Guidance loss node "
            f"(e.g. 'UG Image Guidance') to it, or use the stock KSampler for unguided sampling.")
    if all(t.weight == 0 for t in guidance.terms):
        raise GuidanceInputError(
            f"{node}: input 'guidance': every guidance term ({', '.join(t.name for t in guidance.terms)}) has "
            f"'weight' 0, so nothing would be guided; give at least one loss node a non-zero 'weight'")
    return guidance


def check_vae(node: str, vae):
    if vae is None or not hasattr(vae, "first_stage_model"):
        raise GuidanceInputError(f"{node}: input 'vae' is missing; connect the VAE that matches the model "
                                 f"(e.g. the VAE output of Load Checkpoint)")
    return vae


OPTIONS_TYPE = "UG_SAMPLER_OPTIONS"
OPTIONS_INPUT = {
    "options": (OPTIONS_TYPE, {
        "tooltip": "Expert knobs from a 'UG Sampler Options' node: backward optimizer and early stop, Jacobian, "
                   "smoothing, step cap, strength schedule, a cheaper guidance VAE, CFG branch, low memory. Not "
                   "connected: their defaults."}),
}
# Hidden inputs: the sampler reads its own entry of the prompt for expert knobs that an earlier release's prompt
# sets on the sampler itself (the executor passes only declared widget values).
HIDDEN = {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"}
EXPERT_DEFAULTS = {name: (spec[1].get("default") if len(spec) > 1 else None) for name, spec in EXPERT_KNOBS.items()}
# The widgets an earlier release showed after strength_mode on both samplers, in that order (a workflow file of that
# release stores their values there; guidance_vae was a socket).
LEGACY_LAYOUT = [name for name, spec in EXPERT_KNOBS.items() if not isinstance(spec[0], str) or spec[0] != "VAE"]


class SamplerOptions(dict):
    """The expert knobs of one UG Sampler Options node, every knob present (defaults filled in)."""


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)


def expert_knobs(node: str, options, prompt, unique_id, linked: dict) -> dict:
    """The expert knobs a sampler runs with: the connected options node's, or the values an earlier release's
    prompt sets on the sampler itself (checked by the options node's rules), or the defaults. Both at once is
    refused: it would be unclear which applies."""
    entry = prompt.get(str(unique_id)) if isinstance(prompt, dict) and unique_id is not None else None
    raw = entry.get("inputs") if isinstance(entry, dict) else None
    direct = {k: v for k, v in (raw or {}).items() if k in EXPERT_KNOBS and not _is_link(v)}
    direct.update({k: v for k, v in linked.items() if k in EXPERT_KNOBS})
    if options is not None and not isinstance(options, SamplerOptions):
        raise GuidanceInputError(f"{node}: input 'options' is not the output of a 'UG Sampler Options' node; "
                                 f"connect one, or leave the input unconnected for the defaults")
    if not direct:
        return dict(options) if options is not None else dict(EXPERT_DEFAULTS)
    names = ", ".join(repr(k) for k in direct)
    if options is not None:
        raise GuidanceInputError(
            f"{node}: input 'options' is connected, and this node also sets {names} itself (the layout of an "
            f"earlier release, where these were the sampler's own inputs); set them on the UG Sampler Options "
            f"node only and remove them from this node, so that it is clear which value applies")
    problems = validation.check(UniversalGuidanceSamplerOptions, direct, final=True)
    if problems:
        raise GuidanceInputError(
            f"{node}: " + "; ".join(problems) + " (set on this node itself, the layout of an earlier release; "
            "these inputs now belong on a 'UG Sampler Options' node connected to 'options')")
    return {**EXPERT_DEFAULTS, **validation.legacy_mapped(UniversalGuidanceSamplerOptions, direct)}


class UniversalGuidanceSamplerOptions(CheckedNode):
    """The expert knobs of the Universal KSampler and the Guidance Sampler (Universal), for their 'options'
    input."""

    NAME = "UG Sampler Options"
    DESCRIPTION = ("Expert knobs of the Universal Guidance samplers (Universal KSampler, Guidance Sampler "
                   "(Universal)): backward optimizer and early stop, Jacobian, smoothing, step cap, strength "
                   "schedule, a cheaper guidance VAE, CFG branch, low memory. Connect its output to the sampler's "
                   "'options' input; without it the sampler uses the defaults shown here.")
    RETURN_TYPES = (OPTIONS_TYPE,)
    RETURN_NAMES = ("options",)
    OUTPUT_TOOLTIPS = ("Connect to the 'options' input of a Universal KSampler or Guidance Sampler (Universal).",)
    LEGACY_VALUES = {"low_memory": memory_plan.LEGACY_LOW_MEMORY}
    FUNCTION = "options"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": dict(EXPERT_KNOBS)}

    def options(self, **knobs):
        unknown = sorted(set(knobs) - set(EXPERT_KNOBS))
        if unknown:  # pragma: no cover - the executor passes declared inputs only
            raise GuidanceInputError(f"{self.NAME}: unknown inputs {unknown}")
        return (SamplerOptions({**EXPERT_DEFAULTS, **knobs}),)


class UniversalGuidanceSampler(CheckedNode):
    """A SAMPLER for the stock SamplerCustom / SamplerCustomAdvanced."""

    NAME = "Guidance Sampler (Universal)"
    DESCRIPTION = ("Universal Guidance (Bansal et al. 2023) as a SAMPLER: DDIM/Euler steps with forward guidance "
                   "through the decoded clean prediction, optional backward guidance and self-recurrence. Expert "
                   "knobs: connect a 'UG Sampler Options' node to 'options'.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {**GUIDANCE_INPUTS, **GUIDANCE_KNOBS}, "optional": {**MODE_KNOB, **OPTIONS_INPUT},
                "hidden": dict(HIDDEN)}

    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"
    CATEGORY = CATEGORY

    @classmethod
    def problems(cls, values: dict) -> list:
        return knob_problems(values)

    def get_sampler(self, vae, guidance, options=None, prompt=None, unique_id=None, **knobs):
        return (guided_sampler(self.NAME, vae, guidance, knobs, options, prompt, unique_id),)


def guided_sampler(node: str, vae, guidance, knobs: dict, options, prompt, unique_id):
    """The SAMPLER of a node's guided runs, its inputs checked; ``sampler.ug_runs`` logs each run (for the report)."""
    knobs = knob_values(node, knobs, options, prompt, unique_id)
    guidance = check_guidance(node, guidance)
    vae = check_vae(node, vae)
    settings = settings_from(node, **knobs)
    runs = run_report.RunLog()
    sampler = comfy_bridge.ksampler(guidance, settings, vae, node, report=report_to(runs, guidance, settings),
                                    options=options_from(node, **knobs))
    sampler.ug_runs = runs  # read by UG Run Report
    return sampler


def knob_values(node: str, knobs: dict, options, prompt, unique_id) -> dict:
    """The daily knobs the sampler received plus its expert knobs (``expert_knobs``)."""
    linked = {k: knobs.pop(k) for k in list(knobs) if k in EXPERT_KNOBS}
    return {**knobs, **expert_knobs(node, options, prompt, unique_id, linked)}


def report_to(runs: run_report.RunLog, guidance: Guidance, settings: Settings):
    """A ``report`` callback of the bridge that keeps what ``run_report.render`` needs."""
    def report(stats, lines):
        runs.add({"trace": list(stats.trace), "lines": list(lines), "steps": stats.steps,
                  "window": (settings.start_percent, settings.end_percent), "repeats": settings.recurrence,
                  "backward_steps": settings.backward_steps,
                  "term_windows": {t.name: (t.start_percent, t.end_percent) for t in guidance.terms}})
    return report


def render_run(run: dict, title: str):
    return run_report.render(run["trace"], run["lines"], steps=run["steps"], window=run["window"],
                             repeats=run["repeats"], backward_steps=run["backward_steps"],
                             term_windows=run["term_windows"], title=title)


class UniversalGuidanceRunReport(CheckedNode):
    """The run report of a Universal Guidance SAMPLER, for SamplerCustom / SamplerCustomAdvanced graphs."""

    NAME = "UG Run Report"
    DESCRIPTION = ("A picture of the last run of a Guidance Sampler (Universal): each term's loss per step (and per "
                   "recurrence), the guidance window shaded, the run's counts in the caption.")
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("report",)
    FUNCTION = "render"
    CATEGORY = CATEGORY

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sampler": ("SAMPLER", {"tooltip": "The Guidance Sampler (Universal) whose run to show."}),
            "latent": ("LATENT", {"tooltip": "The output of the SamplerCustom / SamplerCustomAdvanced that ran it "
                                             "(connects the report after the run)."})}}

    def render(self, sampler, latent):
        runs = getattr(sampler, "ug_runs", None)
        if runs is None:
            raise GuidanceInputError(f"{self.NAME}: input 'sampler' is not a Guidance Sampler (Universal)")
        if not runs.runs:
            raise GuidanceInputError(f"{self.NAME}: this sampler has not run yet; connect 'latent' to the output of "
                                     f"the SamplerCustom node that uses it")
        return (render_run(runs.runs[-1], "Guidance Sampler (Universal) run"),)


class UniversalGuidanceKSampler(CheckedNode):
    """KSampler-style convenience node over the same SAMPLER."""

    NAME = "Universal KSampler"
    DESCRIPTION = ("Samples like KSampler, steered by Universal Guidance terms (CLIP, segmentation, face, "
                   "detection, style, image) evaluated on the decoded clean prediction at every guided step.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model (SD1.x/2.x/XL; SD3/Flux on hosts that have them)."}),
                "positive": ("CONDITIONING", {"tooltip": "Positive prompt conditioning."}),
                "negative": ("CONDITIONING", {"tooltip": "Negative prompt conditioning."}),
                "latent_image": ("LATENT", {"tooltip": "The latent to start from (Empty Latent Image, or an "
                                                       "encoded image with denoise < 1)."}),
                **GUIDANCE_INPUTS,
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff,
                                 "tooltip": "Seed of the initial noise (and, derived from it, of the re-noise of "
                                            "self-recurrence)."}),
                "steps": ("INT", {"default": 50, "min": 1, "max": 10000,
                                  "tooltip": "Number of sampling steps (DDIM/Euler)."}),
                "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance scale (1 = off, half the cost)."}),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {
                    "default": "ddim_uniform" if "ddim_uniform" in comfy.samplers.KSampler.SCHEDULERS
                    else comfy.samplers.KSampler.SCHEDULERS[0],
                    "tooltip": "Noise schedule: how the noise level falls from step to step. ddim_uniform gives "
                               "the DDIM steps of the paper; karras or normal are the usual ComfyUI choices."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "Fraction of the schedule to run (1 = from pure noise)."}),
                **GUIDANCE_KNOBS,
            },
            "optional": {**MODE_KNOB, **OPTIONS_INPUT},
            "hidden": dict(HIDDEN),
        }

    RETURN_TYPES = ("LATENT", "IMAGE")
    RETURN_NAMES = ("LATENT", "report")
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    @classmethod
    def problems(cls, values: dict) -> list:
        return knob_problems(values)

    def sample(self, model, positive, negative, latent_image, vae, guidance, seed, steps, cfg, scheduler,
               denoise, options=None, prompt=None, unique_id=None, **knobs):
        node = self.NAME
        sampler = guided_sampler(node, vae, guidance, knobs, options, prompt, unique_id)
        if denoise <= 0:
            line = "denoise 0: nothing was sampled or guided; the latent is returned unchanged"
            comfy_bridge.log.info("Universal Guidance: %s", line)
            return (latent_image, run_report.render([], [line], steps=steps))
        sigmas = comfy_bridge.sigmas_for(model, scheduler, steps, denoise)
        latent = latent_image["samples"]
        if hasattr(comfy.sample, "fix_empty_latent_channels"):
            latent = comfy.sample.fix_empty_latent_channels(model, latent)
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        samples = comfy.sample.sample_custom(
            model, noise, cfg, sampler, sigmas, positive, negative, latent,
            noise_mask=latent_image.get("noise_mask"), disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
            seed=seed)
        out = latent_image.copy()
        out["samples"] = samples
        runs = sampler.ug_runs.runs
        report = render_run(runs[-1], f"{node} run") if runs else run_report.render([], [], steps=steps)
        return (out, report)
