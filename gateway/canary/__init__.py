"""The canary safety gate: probe a candidate adapter and the base with the project's held-back
harmful and benign prompts, judge every answer, and decide whether the adapter may take traffic."""
