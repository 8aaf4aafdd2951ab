"""Asset builders: the bundled tiny models and their tokenizer, the offline harness tasks, and real models fetched without a hub."""
