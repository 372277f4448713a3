"""
The paper's evaluation (E8) and its comparison, apart from the method itself:
- metrics.py: reward, diversity, coherence, perplexity, KL, grammar, speed;
- report.py: a summary row per method, every response as a record, the printed table;
- baselines.py: prompting, static editing, best-of-N, ARGS and CD as plug-ins to the one sampling
  loop;
- harness.py: methods over prompts and seeds, and the sweep of E7's strength;
- plots.py: the figures of compare.py.
"""
