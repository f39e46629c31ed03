"""Chat: the conversation template (template.py), synthetic tasks (tasks.py) and the REPL (repl.py)."""
