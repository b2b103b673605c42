"""Public benchmarks run offline from local files: readers, answer rules, scores and writers."""
