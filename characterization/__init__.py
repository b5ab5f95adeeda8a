"""The characterization suite: TaQ-DiT's claims about post-GELU activations as pytest checks, a stats regression
against committed baselines, and sampler benchmarks. Run it from the repository root:

    pytest characterization/                       # the embedded default (pocket), ci recipe, offline
    pytest characterization/ --taq-recipe paper    # TaQ-DiT's 256 trajectories
    pytest characterization/ --taq-model sd3-medium --taq-checkpoint sd3_medium.safetensors

What a session does
-------------------
1. Data (session fixtures in conftest.py, code in taq/pipeline.py, recipes in taq/recipes.py). The model under test (`--taq-model`, default
   `pocket`; `--taq-checkpoint PATH` for SD3-layout weights) samples the recipe's calibration set -- ci: 64
   trajectories x 100 Euler steps, 25 kept with TaQ-DiT's stride, CFG 1.5, seed 0; paper: 256 trajectories --
   and 512 of its points are profiled into per-(layer, timestep) statistics, in 8 trajectory groups. Both are cached under
   `.cache/taq/` (git-ignored) with a hash of the model's weights, the recipe and the seeds in the file name, so
   a second run reuses them. `--taq-calibration FILE` uses an existing calibration set instead.
2. Claims (test_claims.py): one test per claim, parametrized over the model's FFN layers (`[mm_07_img]`).
   Measurements and thresholds live in `taq/analysis/claims.py` (`CLAIMS`, each with the TaQ-DiT observation it
   encodes): asymmetry (max/|min| and the share of a symmetric 8-bit grid below the minimum), temporal drift
   (per-timestep p0.1..p99.9 range, per-channel mean shift), channel outliers (top 2% of channels vs the median;
   the outlier fraction is reported per layer), and the time-aware benefit (8- and 4-bit quantization MSE with one
   range for all timesteps vs one per timestep, estimated from the histograms). Each value gets a bootstrap 95%
   interval over the profile's 8 trajectory groups (taq/analysis/uncertainty.py), and its outcome is holds
   (interval above the threshold), does not hold (below) or undecided (containing it). `expectations/<model>.json`
   stores each (claim, layer) pair's outcome; a pair expected not to hold runs as `xfail(strict=True)`, and a
   reversal (holds <-> does not hold) fails the suite, while a move to or from undecided is an xfail. Every
   measurement lands in the claims table, pass or not.
3. Stats regression (test_regression.py, regression.py): the statistics against `baselines/<model>.npz`, cell by
   cell, with documented tolerances; a failure names layer, timestep, statistic, expected, got and tolerance. A
   test of the test profiles the model with one FFN weight matrix scaled by 1.05 and checks the comparison fails.
4. Benchmarks (test_benchmarks.py, pytest-benchmark): a CFG Euler step, a whole trajectory, traced vs untraced
   forward and the statistics accumulation on the pocket model; a random-weight sd3-medium at 512x512 on GPU/Metal
   devices (on the CPU only with `--taq-bench-sd3`). Nothing asserts a time.
5. Report (pytest_sessionfinish): `reports/latest/` (`--taq-report-dir`) gets index.html (figures, summary,
   claims, timings), claims.json / claims.md with one figure per claim in claims/, and benchmarks.json; the
   paths are printed at the end of the run.

Regenerating the committed files
--------------------------------
    pytest characterization/ --taq-update-expectations   # expectations/<model>.json from this run's measurements
    pytest characterization/ --taq-update-baselines      # baselines/<model>.npz from this run's statistics

Both are made with the ci recipe; look at the diff before committing (a flipped expectation is a finding).
"""
