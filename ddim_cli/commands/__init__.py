"""One module per ``ddim`` command (a thin layer: parse, check, call the library, print);
``ddim_cli.cli`` assembles them into the app. Options shared by several commands are declared once
in :mod:`ddim_cli.commands.options`, helpers they share in errors, running and progress; no command
module imports another."""
