"""The command line (`decodebench ...` / `python -m bench ...`): one module a command, plus the table
formatting they share. Commands read cases and call measure/; nothing below imports them."""
