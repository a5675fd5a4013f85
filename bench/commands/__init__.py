"""The command line (`decodebench ...` / `python -m bench ...`): one module a command (cli.py assembles
them), plus what they share: arguments.py (argument types and checks) and model_inputs.py (the model, GPU
and interconnect step, advise and validate read). Commands parse and call operators/, measure/ and
serving/; nothing below imports them."""
