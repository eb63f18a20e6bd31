"""The conditions and budgets of the comparison: what each row is, and which rows it is compared with.

CONDITIONS maps a row to its meta_pretrain.py flags (None: no priming); BUDGETS holds the stage flags
of every run of a budget; baselines_of names the rows a condition is compared with, dose_ladder the
dose-response. compare.py plans and runs them.
"""

# Budgets: the stage flags of each run. They spell out every flag that shapes a run (not the
# stages' defaults), so a changed default in a stage cannot silently change a comparison.
# The priming of every budget: the inner loop of the inner-loop search (0.3 x 5 steps: support loss
# to ~0.58 x) and the outer learning rate of the outer-loop pilot (RESULTS.md: 2e-4 diverges after 30
# meta-steps, 2e-5 is slower, 5e-5 keeps the held-out query loss falling to meta-step 200).
PRIME_SHAPE = ["--inner-steps", "5", "--inner-lr", "0.3", "--outer-lr", "5e-5"]
# Full fine-tuning (the reference row) takes finetune_peft.LR_FULL, not the budgets' PEFT rate: at 1e-3
# the whole encoder collapses (dev F1 0.0 at step 100; RESULTS.md).
FULL_FT_LR = "3e-5"
BUDGETS = {
    "cpu": {"prime": ["--steps", "200", "--tasks-per-step", "2", "--batch-size", "8", "--max-sentences", "2000",
                      *PRIME_SHAPE],
            "finetune": ["--steps", "1000", "--batch-size", "16", "--max-sentences", "20000", "--lr", "1e-3",
                         "--warmup", "0.1", "--eval-every", "100", "--dev-sentences", "1000"],
            "evaluate": []},
    "gpu": {"prime": ["--steps", "1000", "--tasks-per-step", "4", "--batch-size", "16", "--max-sentences", "20000",
                      *PRIME_SHAPE],
            "finetune": ["--steps", "3000", "--batch-size", "32", "--max-sentences", "20000", "--lr", "1e-3",
                         "--warmup", "0.1", "--eval-every", "300", "--dev-sentences", "10000"],
            "evaluate": []},
    "smoke": {"prime": ["--steps", "2", "--tasks-per-step", "1", "--batch-size", "4", "--max-sentences", "40",
                        "--eval-every", "1", "--eval-sentences", "8", "--max-len", "32", *PRIME_SHAPE],
              "finetune": ["--steps", "4", "--batch-size", "4", "--max-sentences", "40", "--eval-every", "2",
                           "--dev-sentences", "16", "--max-len", "32"],
              "evaluate": []},
}

# condition -> meta_pretrain.py flags (None: no priming). The first three are the main rows.
CONDITIONS = {
    "no priming": None,
    "MTL priming": ["--method", "mtl"],
    "MAML priming": [],
    "dose: MAML priming for 1/4 of the meta-steps": [],
    "ablation: inner loop on all parameters": ["--inner-params", "all"],
    "ablation: same-language query": ["--query", "same"],
    "ablation: first-order": ["--first-order"],
    "ablation: outer update of initial PEFT": ["--outer-peft"],
    "MTL priming at MAML's compute": ["--method", "mtl"],                  # + EQUAL_COMPUTE's --steps
    "multi-source fine-tuning (en + priming languages)": None,          # + MULTI_SOURCE's fine-tuning flags
    "implicit MAML priming": ["--inner-loop", "implicit", "--curvature", "hessian"],   # the inner loop is a fine-tuning
    "implicit MAML priming (first order)": ["--inner-loop", "implicit", "--first-order"],
    "implicit MAML priming (Gauss-Newton)": ["--inner-loop", "implicit", "--curvature", "ggn"],
}
# Run only when --conditions names them: an implicit meta-step costs ~2x an unrolled one (RESULTS.md).
OPT_IN = ("implicit MAML priming", "implicit MAML priming (first order)", "implicit MAML priming (Gauss-Newton)")
MAIN_ROWS = ("no priming", "MTL priming", "MAML priming")
# The practitioner's baseline: no priming; the PEFT tensors and head fine-tuned on en plus the
# priming languages' train sentences (the pool priming draws from: the budget's --max-sentences).
MULTI_SOURCE = "multi-source fine-tuning (en + priming languages)"
# MTL priming given the wall time of MAML priming: MAML's meta-step costs this many MTL steps
# (sum of the meta-steps' seconds in the verdict-cpu priming logs: adapter 1021 s vs 180 s, prefix
# 1081 s vs 176 s for 200 steps, both on the 2-core CPU with two processes; RESULTS.md).
EQUAL_COMPUTE = "MTL priming at MAML's compute"
EQUAL_COMPUTE_FACTOR = {"adapter": 1021 / 180, "prefix": 1081 / 176, "lora": 1021 / 180}
# dose-response rows: MAML priming with a fraction of the budget's meta-steps (0 is "no priming"),
# fine-tuned with the main rows' seeds so they pair with them
DOSES = {"dose: MAML priming for 1/4 of the meta-steps": 0.25}
FIRST = MAIN_ROWS + tuple(DOSES) + (MULTI_SOURCE, EQUAL_COMPUTE)  # run first, with the main rows' fine-tuning seeds
FULL_ROW = ("full", "full fine-tuning (reference)")
SOURCE_LANG = "en"  # fine-tuning language of every run


def baselines_of(condition):
    """The rows a condition is compared with (compare_report.paired_rows), in the table's order."""
    if condition == "no priming":
        return []
    bases = ["no priming"]
    if condition in ("MAML priming", EQUAL_COMPUTE):
        bases.append("MTL priming")
    if condition == "MAML priming":
        bases.append(EQUAL_COMPUTE)
    if condition in OPT_IN:   # does a faithful simulation of the fine-tuning change the answer? and at what cost?
        bases += ["MTL priming", "MAML priming", EQUAL_COMPUTE]
        bases += ["implicit MAML priming"] if "first order" in condition else []
        if "Gauss-Newton" in condition:   # the second-order term, measured: against first order and the exact Hessian
            bases += ["implicit MAML priming (first order)", "implicit MAML priming"]
    if condition.startswith("ablation:"):
        bases.append("MAML priming")
    if condition in ("MTL priming", "MAML priming", EQUAL_COMPUTE):
        bases.append(MULTI_SOURCE)   # does priming beat fine-tuning on the same labelled languages?
    return bases


def dose_ladder(args):
    """[(condition, meta-steps)] of the dose-response: no priming, the dose rows, the MAML row."""
    steps = budget_steps(args)
    doses = sorted((max(1, round(steps * f)), c) for c, f in DOSES.items())
    return [("no priming", 0), *[(c, n) for n, c in doses], ("MAML priming", steps)]


def budget_steps(args):
    budget = BUDGETS[args.budget]["prime"]
    return int(budget[budget.index("--steps") + 1])
