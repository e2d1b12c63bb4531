"""The `fusionrank` command line: the one layer that knows every other (core, export, clients, loadtest).

`main` parses arguments (`parser`), and each subcommand's handler (`commands`) only translates them into typed
arguments of one library function. `demo` strings every layer together on the default spec.
"""
