"""The ``paper`` recipes against the authors' training recipes, as the follow-up fixture READMEs state them.

Every value compared here is read from the README text (../shared/fixtures/followups/<variant>/README.txt)
with a regular expression; no number of a recipe is typed into this file. There is one small extractor
per README family:

  PSP   (psp, psp_weak)          "Training schedule facts (for information)" prose
  CPSP  (cpsp, cpsp_weak; avsdn)  "Training schedule facts (for information)" prose; avsdn's README points
                                  to the cpsp (fully) / cpsp_weak (weakly) sections
  CMBS  (cmbs, cmbs_weak, cmran, cmran_weak)  "Training recipe (as the scripts run it)" table

and one loss-weight extractor per family (the "Training loss(es)" / "Losses" sections). A pattern is
written with plain spaces; each space matches any run of whitespace (the READMEs wrap lines anywhere).
A README/recipe disagreement fails with the recipe value, the README value and the README line.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import pytest

from avel.config import recipe
from avel.models import model_class

NUM = r"(\d+(?:\.\d+)?(?:e-?\d+)?)"          # 100, 0.01, 1e-3


def rx(pattern: str, flags: int = 0) -> re.Pattern:
    """Compile a README phrase: every literal space matches any whitespace run (line wraps included)."""
    return re.compile(pattern.replace(" ", r"\s+"), flags)


def _paper_recipes() -> list[tuple[str, str]]:
    names = sorted(p.name for p in files("avel").joinpath("recipes").iterdir()
                   if p.name.startswith("paper-") and p.name.endswith(".yaml"))
    return [tuple(n[len("paper-"):-len(".yaml")].split("-", 1)) for n in names]


PAPER = _paper_recipes()


# --- README access ------------------------------------------------------------------------------

@dataclass
class Readme:
    path: Path
    text: str

    @classmethod
    def of(cls, fixtures_dir: Path, variant: str) -> Readme:
        path = fixtures_dir / "followups" / variant / "README.txt"
        if not path.is_file():
            pytest.fail(f"no README for variant {variant!r} at {path}")
        return cls(path, path.read_text())

    def where(self, pos: int) -> str:
        return f"{self.path.parent.name}/README.txt:{self.text.count(chr(10), 0, pos) + 1}"

    def section(self, title: str) -> tuple[int, int]:
        """Span of the section whose (one- or two-line) heading, underlined with dashes, starts with title."""
        heads = list(re.finditer(r"(?:\A|\n\n)((?:[^\n]+\n){1,2})-{3,}\n", self.text))
        for i, m in enumerate(heads):
            if " ".join(m.group(1).split()).startswith(title):
                end = heads[i + 1].start() if i + 1 < len(heads) else len(self.text)
                return m.end(), end
        pytest.fail(f"{self.path}: no section {title!r}")

    def find(self, span: tuple[int, int], pattern: re.Pattern, what: str, *, required: bool = True):
        m = pattern.search(self.text, *span)
        if m is None and required:
            pytest.fail(f"{self.path.parent.name}/README.txt: the {what} phrase /{pattern.pattern}/ is not in "
                        f"its section (lines {self.where(span[0])}..): the README changed; update the extractor")
        return m


@dataclass
class Fact:
    value: object
    where: str          # README file:line (or a note when the value is the README's silence)
    phrase: str         # the README text it was read from


def _multistep(f: dict, readme, m) -> None:
    """A MultiStepLR match (group 1 the milestone list, group 2 gamma) -> the recipe's schedule fields."""
    f["optim.schedule"] = _fact(readme, m, "multistep")
    f["optim.milestones"] = _fact(readme, m, tuple(int(x) for x in m.group(1).split(",")))
    f["optim.gamma"] = _fact(readme, m, float(m.group(2)))


def _fact(readme: Readme, m: re.Match, value) -> Fact:
    return Fact(value, readme.where(m.start()), " ".join(m.group(0).split()))


# --- extractor: PSP family ("Training schedule facts (for information)") ------------------------

def psp_schedule(readme: Readme) -> dict[str, Fact]:
    span = readme.section("Training schedule facts")
    f = {}
    # psp: "optimizer: Adam, lr 1e-3, no weight decay"; psp_weak: "Adam lr 1e-3, no weight decay"
    m = readme.find(span, rx(rf"\b(Adam|AdamW|SGD),? lr {NUM}"), "optimizer / lr")
    f["optim.name"] = _fact(readme, m, m.group(1).lower())
    f["optim.lr"] = _fact(readme, m, float(m.group(2)))
    m = readme.find(span, rx(r"\bno weight decay\b", re.I), "weight decay")
    f["optim.weight_decay"] = _fact(readme, m, 0.0)
    # psp: "multiplied by 0.8 after an epoch when (epoch+1) % 60 == 0 and epoch < 170";
    # psp_weak: "LR * 0.8 after an epoch when (epoch+1) % 80 == 0 and epoch < 200"
    rule = readme.find(span, rx(rf"(?:multiplied by|LR \*) {NUM} after an epoch when "
                                r"\(epoch\+1\) % (\d+) == 0 and epoch < (\d+)"), "LR decay rule")
    # "300 epochs (:35)"
    m = readme.find(span, rx(r"\b(\d+) epochs \("), "epochs")
    f["epochs"] = _fact(readme, m, int(m.group(1)))
    gamma, period, limit = float(rule.group(1)), int(rule.group(2)), int(rule.group(3))
    # The rule decays the lr AFTER 0-based epoch e, i.e. from epoch e + 1 on: milestone e + 1 (avel's
    # multistep milestones count epochs: the factor applies from epoch m on, engine/train.py make_schedule).
    after = [e for e in range(f["epochs"].value) if (e + 1) % period == 0 and e < limit]
    f["optim.schedule"] = _fact(readme, rule, "multistep")
    f["optim.milestones"] = _fact(readme, rule, tuple(e + 1 for e in after))
    f["optim.gamma"] = _fact(readme, rule, gamma)
    # the README's own reading of the rule: "i.e. after epochs 59 and 119"
    ie = readme.find(span, rx(r"i\.e\. after epochs (\d+) and (\d+)"), "decay epochs")
    assert after == [int(ie.group(1)), int(ie.group(2))], (
        f"{readme.where(rule.start())}: the rule {rule.group(0)!r} implies decays after epochs {after}, but the "
        f"README says {ie.group(0)!r} ({readme.where(ie.start())})")
    # psp: "batch size 128 (:36)"; psp_weak: "batch 128 (:45)"
    m = readme.find(span, rx(r"\bbatch(?: size)? (\d+) \("), "batch size")
    f["batch_size"] = _fact(readme, m, int(m.group(1)))
    # psp: "seeded with 123"; psp_weak: "seed 123"
    m = readme.find(span, rx(r"\bseed(?:ed with)? (\d+)"), "seed")
    f["seed"] = _fact(readme, m, int(m.group(1)))
    # "evaluation every 5 epochs"
    m = readme.find(span, rx(r"evaluation every (\d+) epochs", re.I), "evaluation frequency")
    f["eval_every"] = _fact(readme, m, int(m.group(1)))
    # psp: "3339 // 128 = 26 batches per epoch (the remainder is dropped"; psp_weak: "3517 in all, 27 batches"
    m = readme.find(span, rx(r"the remainder is dropped"), "drop last", required=False)
    if m is not None:
        f["drop_last"] = _fact(readme, m, True)
    else:
        m = readme.find(span, rx(r"\b(\d+) in all, (\d+) batches"), "rows / batches per epoch")
        rows, batches, bs = int(m.group(1)), int(m.group(2)), f["batch_size"].value
        assert batches in (rows // bs, -(-rows // bs)), f"{readme.where(m.start())}: {m.group(0)!r} vs batch {bs}"
        f["drop_last"] = _fact(readme, m, rows % bs != 0 and batches == rows // bs)
    # No clipping phrase in the section: the reference does not clip (ScheduledOptim only steps).
    m = readme.find(span, rx(r"\bclip", re.I), "gradient clipping", required=False)
    if m is None:
        f["optim.grad_clip"] = Fact(0.0, f"{readme.where(span[0])} (section)", "no gradient clipping stated")
    else:
        pytest.fail(f"{readme.where(m.start())}: PSP schedule now mentions clipping; extend the extractor")
    return f


# --- extractor: CPSP family ("Training schedule facts (for information)") -----------------------

def cpsp_schedule(readme: Readme) -> dict[str, Fact]:
    span = readme.section("Training schedule facts")
    f = {}
    # cpsp: "Adam, lr 0.001 (run_fully_supv.sh:21; ...)"; cpsp_weak: "Adam lr 0.001 (run_weakly_supv.sh:19; ...)"
    m = readme.find(span, rx(rf"\b(Adam|AdamW|SGD),? lr {NUM}"), "optimizer / lr")
    f["optim.name"] = _fact(readme, m, m.group(1).lower())
    f["optim.lr"] = _fact(readme, m, float(m.group(2)))
    # "no weight decay (default_config.yaml:9 sets weight_decay 5e-4 but it is never used)"
    m = readme.find(span, rx(r"\bno weight decay\b", re.I), "weight decay")
    f["optim.weight_decay"] = _fact(readme, m, 0.0)
    # "MultiStepLR milestones [10, 20, 30], gamma 0.5, stepped once per epoch"
    _multistep(f, readme, readme.find(span, rx(rf"MultiStepLR milestones \[([\d,\s]+)\], gamma {NUM}"), "LR schedule"))
    # cpsp: "Gradient norm clipped to 0.1"; cpsp_weak: "gradient norm clip 0.1"
    m = readme.find(span, rx(rf"\bgradient norm clip(?:ped to)? {NUM}", re.I), "gradient clipping")
    f["optim.grad_clip"] = _fact(readme, m, float(m.group(1)))
    # cpsp: "batch 64 (run_fully_supv.sh:12, 30)"; cpsp_weak: "batch 64, test batch 64" (the first is training)
    m = readme.find(span, rx(r"\bbatch (\d+)\b"), "batch size")
    f["batch_size"] = _fact(readme, m, int(m.group(1)))
    # "45 epochs (:14, 33)"
    m = readme.find(span, rx(r"\b(\d+) epochs\b"), "epochs")
    f["epochs"] = _fact(readme, m, int(m.group(1)))
    # "seed 123 (:1; random, numpy, torch, ...)"
    m = readme.find(span, rx(r"\bseed (\d+)"), "seed")
    f["seed"] = _fact(readme, m, int(m.group(1)))
    # "Validation every epoch (eval_freq 1) on the VAL split"
    m = readme.find(span, rx(r"Validation every (?:(\d+) epochs|epoch)\b"), "evaluation frequency")
    f["eval_every"] = _fact(readme, m, int(m.group(1) or 1))
    return f


# --- extractor: CMBS / CMRAN family ("Training recipe (as the scripts run it)" table) -----------

def cmbs_recipe(readme: Readme) -> dict[str, Fact]:
    span = readme.section("Training recipe")
    f = {}
    # "  learning rate     0.0007  supv_train.sh:3"
    m = readme.find(span, rx(rf"^ learning rate {NUM}", re.M), "learning rate")
    f["optim.lr"] = _fact(readme, m, float(m.group(1)))
    # "  optimizer         Adam(lr), torch defaults betas (0.9, 0.999), eps 1e-8, NO weight decay"
    m = readme.find(span, rx(r"^ optimizer (Adam|AdamW|SGD)\(", re.M), "optimizer")
    f["optim.name"] = _fact(readme, m, m.group(1).lower())
    m = readme.find(span, rx(rf"\bbetas \({NUM}, {NUM}\)"), "betas")
    f["optim.betas"] = _fact(readme, m, (float(m.group(1)), float(m.group(2))))
    m = readme.find(span, rx(r"\bno weight decay\b", re.I), "weight decay")
    f["optim.weight_decay"] = _fact(readme, m, 0.0)
    # "  LR schedule       MultiStepLR(milestones [10, 20, 30], gamma 0.5), stepped once per epoch"
    _multistep(f, readme, readme.find(span, rx(rf"MultiStepLR\(milestones \[([\d,\s]+)\], gamma {NUM}\)"),
                                      "LR schedule"))
    # "  grad clip         0.5     supv_train.sh:4: clip_grad_norm_ ..."
    m = readme.find(span, rx(rf"^ grad clip {NUM}", re.M), "grad clip")
    f["optim.grad_clip"] = _fact(readme, m, float(m.group(1)))
    # "  epochs            200     supv_train.sh:6"
    m = readme.find(span, rx(r"^ epochs (\d+)", re.M), "epochs")
    f["epochs"] = _fact(readme, m, int(m.group(1)))
    # "  batch size        64      supv_train.sh:7" (the "test batch size" row is not anchored here)
    m = readme.find(span, rx(r"^ batch size (\d+)", re.M), "batch size")
    f["batch_size"] = _fact(readme, m, int(m.group(1)))
    # "  seed              43 for random, numpy, torch and cuda"
    m = readme.find(span, rx(r"^ seed (\d+)", re.M), "seed")
    f["seed"] = _fact(readme, m, int(m.group(1)))
    # "  evaluation        every epoch (eval_freq 1, default_config.yaml:14)"
    m = readme.find(span, rx(r"^ evaluation every (?:(\d+) epochs|epoch)\b", re.M), "evaluation frequency")
    f["eval_every"] = _fact(readme, m, int(m.group(1) or 1))
    return f


# --- loss weights, one extractor per family --------------------------------------------------------

# one term of a README loss formula: "loss_cls", "LAMBDA * loss_avps", "0.01 * loss_scon", "label_is_gate"
TERM = rf"(?:(?:{NUM}|[A-Z_]+) \* )?(?:loss|label)_\w+"


def _term_key(name: str) -> str:
    """README term name -> model loss-term name: loss_is_event -> is_event, label_is_gate -> gate."""
    return re.sub(r"^(?:loss_|label_is_)", "", name)


def _formula(readme: Readme, span, lhs: str, default: float = 1.0) -> tuple[dict[str, float], Fact]:
    """Weights of "<lhs> = [w *] term + ..." (a symbolic weight such as LAMBDA is looked up as "LAMBDA = 100")."""
    m = readme.find(span, rx(rf"\b{lhs} = ({TERM}(?: \+ {TERM})*)"), f"loss formula {lhs} = ...")
    weights = {}
    for t in re.finditer(r"(?:(\S+)\s*\*\s*)?((?:loss|label)_\w+)", m.group(1)):
        coef, name = t.group(1), t.group(2)
        if coef is None:
            w = default
        elif re.fullmatch(NUM, coef):
            w = float(coef)
        else:   # "LAMBDA * loss_avps" ... "LAMBDA = 100"
            w = float(readme.find(span, rx(rf"\b{re.escape(coef)} = {NUM}"), f"value of {coef}").group(1))
        weights[_term_key(name)] = w
    return weights, _fact(readme, m, None)


def psp_loss_weights(readme: Readme, task: str) -> tuple[dict[str, float], Fact]:
    span = readme.section("Training loss")
    # psp: "loss = loss_cls + LAMBDA * loss_avps, LAMBDA = 100."
    if readme.find(span, rx(rf"\bloss = {TERM}"), "loss formula", required=False):
        return _formula(readme, span, "loss")
    # psp_weak: "loss = torch BCELoss (mean over B*29) of out_avg against prob_labels." (one term, weight 1)
    m = readme.find(span, rx(r"\bloss = torch (\w+)Loss\b"), "single-term loss")
    return {m.group(1).lower(): 1.0}, _fact(readme, m, None)


def cpsp_loss_weights(readme: Readme, task: str) -> tuple[dict[str, float], Fact]:
    span = readme.section("Training loss")
    # cpsp: "loss_total = loss_is_event + loss_event_class + 100 * loss_avps + 0.01 * loss_scon + 1 * loss_vcon"
    # cpsp_weak: "loss_total = loss_event_class + 1 * loss_vcon."
    return _formula(readme, span, "loss_total")


def cmbs_loss_weights(readme: Readme, task: str) -> tuple[dict[str, float], Fact]:
    span = readme.section("Training loss")
    # cmbs: "Terms (all weight 1, ...)"; cmran: "Terms (weight 1 each, ...)";
    # cmbs_weak / cmran_weak: "loss_total = loss_event_class (the only term; weight 1)."
    default = float(readme.find(span, rx(rf"\b(?:all )?weight {NUM}\b"), "term weight").group(1))
    # cmbs: "loss (training) = loss_is_event + label_is_gate + loss_event_class + loss_cas"
    # cmran and the weak models: "loss_total = loss_is_event + loss_event_class"
    lhs = r"loss \(training\)" if readme.find(span, rx(r"\bloss \(training\) ="), "", required=False) else "loss_total"
    return _formula(readme, span, lhs, default)


# The model names AVSDN's weak video-class term "video_class" (the README: weakly_loss_event_class).
AVSDN_TERM_NAMES = {"weak": {"event_class": "video_class"}}


def avsdn_loss_weights(readme: Readme, task: str) -> tuple[dict[str, float], Fact]:
    span = readme.section("Losses")
    if task == "supervised":
        # "fully (fully_supv_main.py:245-255): loss_is_event (BCEWithLogits, ...) + loss_event_class (...)"
        m = readme.find(span, rx(r"\bfully \([^)]*\): (loss_\w+) \([^)]*\) \+ (loss_\w+) \("), "fully loss")
        return {_term_key(m.group(1)): 1.0, _term_key(m.group(2)): 1.0}, _fact(readme, m, None)
    # "weakly (weakly_supv_main.py:229-236): weakly_loss_event_class = MultiLabelSoftMarginLoss(...) ...
    #  plus 1 * video_contrastive_loss(fusion, class, margin 0.6, neg_num 4) when vcon_flag is set"
    m = readme.find(span, rx(r"\bweakly \([^)]*\): weakly_(loss_\w+) ="), "weakly loss")
    v = readme.find(span, rx(rf"\bplus {NUM} \* video_contrastive_loss\("), "weakly vcon weight")
    names = AVSDN_TERM_NAMES["weak"]
    key = _term_key(m.group(1))
    return {names.get(key, key): 1.0, "vcon": float(v.group(1))}, _fact(readme, m, None)


# --- which README each recipe is checked against -----------------------------------------------

FAMILIES = {
    "psp": (psp_schedule, psp_loss_weights), "psp_weak": (psp_schedule, psp_loss_weights),
    "cpsp": (cpsp_schedule, cpsp_loss_weights), "cpsp_weak": (cpsp_schedule, cpsp_loss_weights),
    "avsdn": (cpsp_schedule, avsdn_loss_weights),
    "cmbs": (cmbs_recipe, cmbs_loss_weights), "cmbs_weak": (cmbs_recipe, cmbs_loss_weights),
    "cmran": (cmbs_recipe, cmbs_loss_weights), "cmran_weak": (cmbs_recipe, cmbs_loss_weights),
}


def schedule_readme(fixtures_dir: Path, task: str, model: str) -> Readme:
    """The README holding the model's training schedule; AVSDN's points to the CPSP ones."""
    own = Readme.of(fixtures_dir, model)
    if model != "avsdn":
        return own
    # "Training facts: see ../cpsp/README.txt (fully) and ../cpsp_weak/README.txt (weakly)"
    m = own.find((0, len(own.text)), rx(r"Training facts: see \.\./(\w+)/README\.txt \(fully\) and "
                                        r"\.\./(\w+)/README\.txt \(weakly\)"), "training facts pointer")
    return Readme.of(fixtures_dir, m.group(1) if task == "supervised" else m.group(2))


def _get(config, key: str):
    for part in key.split("."):
        config = getattr(config, part)
    return config


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return tuple(a) == tuple(b)
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and not isinstance(a, bool) and float(a) == float(b)
    return a == b


def _check(facts: dict[str, Fact], actual, what: str):
    bad = [f"  {key}: recipe {_get(actual, key)!r} != README {fact.value!r}  ({fact.where}: {fact.phrase!r})"
           for key, fact in facts.items() if not _same(_get(actual, key), fact.value)]
    assert not bad, f"{what} disagrees with the authors' recipe:\n" + "\n".join(bad)


# --- the tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("task,model", PAPER, ids=[f"{t}-{m}" for t, m in PAPER])
def test_paper_recipe_schedule_matches_readme(fixtures_dir, task, model):
    """optimizer, lr, weight decay, batch, epochs, schedule, clipping, seed, eval frequency, drop-last."""
    assert model in FAMILIES, f"paper recipe for {model!r}: no README family known to this test"
    config = recipe("paper", task, model)
    readme = schedule_readme(fixtures_dir, task, model)
    facts = FAMILIES[model][0](readme)
    _check(facts, config, f"avel/recipes/paper-{task}-{model}.yaml")


@pytest.mark.parametrize("task,model", PAPER, ids=[f"{t}-{m}" for t, m in PAPER])
def test_paper_recipe_loss_weights_match_readme(fixtures_dir, task, model):
    config = recipe("paper", task, model)
    cls = model_class(model)
    effective = {**cls.loss_weights, **config.loss_weights}     # the recipe may override the class defaults
    readme = Readme.of(fixtures_dir, model)
    stated, fact = FAMILIES[model][1](readme, task)
    if tuple(cls.tasks) == (task,):
        got = effective                      # a one-task model: every term it has must be a README term
    else:
        got = {k: effective.get(k) for k in stated}     # AVSDN: only this task's terms
    assert got == stated, (f"{model} ({task}) loss weights {got} != README {stated} "
                           f"({fact.where}: {fact.phrase!r})")


@pytest.mark.parametrize("task,model", PAPER, ids=[f"{t}-{m}" for t, m in PAPER])
def test_paper_recipe_records_fixes_and_selects_on_val(fixtures_dir, task, model):
    config = recipe("paper", task, model)
    assert config.recipe == "paper" and config.model == model and config.task == task
    assert config.fixes, f"paper-{task}-{model}.yaml lists no fixes"
    assert all(isinstance(x, str) and x.strip() for x in config.fixes)
    assert config.data.val_split == "val", f"paper-{task}-{model}.yaml selects on {config.data.val_split!r}"
    # psp: "So the repository selects its checkpoint on the test split."; psp_weak: "selection on test.";
    # cmbs: "model selection on the TEST split"; cpsp: "Selection is on val."; cpsp_weak: "selection on val"
    readme = schedule_readme(fixtures_dir, task, model)
    m = readme.find((0, len(readme.text)), rx(r"\bselect(?:s its checkpoint|ion(?: is)?) on (?:the )?(test|val)\b",
                                              re.I), "checkpoint selection")
    if m.group(1).lower() == "test":
        assert any("valid" in x for x in config.fixes), (
            f"the reference selects on test ({readme.where(m.start())}: {' '.join(m.group(0).split())!r}); "
            f"paper-{task}-{model}.yaml must record the validation selection among its fixes: {config.fixes}")


def test_every_followup_variant_has_a_paper_recipe(fixtures_dir):
    """Each fixture variant (and AVSDN for both tasks its README points to) has a paper recipe."""
    root = fixtures_dir / "followups"
    want = set()
    for readme in sorted(root.glob("*/README.txt")):
        variant = readme.parent.name
        if variant == "avsdn":
            want |= {("supervised", "avsdn"), ("weak", "avsdn")}
        else:
            want.add(("weak" if variant.endswith("_weak") else "supervised", variant))
    assert want, f"no follow-up READMEs under {root}"
    assert want == set(PAPER), f"missing: {sorted(want - set(PAPER))}, unexpected: {sorted(set(PAPER) - want)}"
