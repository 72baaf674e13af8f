"""Orchestration: the jobs that run the plugin's commands, not part of the fairseq plugin itself.

- :mod:`.commands`: the one recorded-command runner (``commands.sh``, streamed logs, children that die
  with their parent, the ``done/<step>.json`` convention) and memory sampling.
- :mod:`.stages`: a resumable stage runner (dependencies, ``jobs`` stages at a time).
- :mod:`.main_job` (``mtssl-main-job``), :mod:`.report`, :mod:`.training_log`.
- :mod:`.evaluate_upstream` (``mtssl-evaluate-upstream``), :mod:`.vgs_scenarios` (``mtssl-vgs-train``).
"""
