"""Generation: reasoning-on (trace) and reasoning-off (empty trace) responses from vLLM."""
