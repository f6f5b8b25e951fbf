"""Operator commands, one module per command, each a plan then an execute.

A command first builds a plan: what it found and what it would do, a value the CLI can print (a dry
run, ``--json``) and a test can inspect. Executing the plan is a separate call, so nothing is changed
or deleted before the plan is complete. The CLI (``s3repofs/cli``) only parses, calls and prints.
"""
