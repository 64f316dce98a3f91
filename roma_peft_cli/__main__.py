"""``python -m roma_peft_cli``: the ``roma-peft`` command."""

from . import main

raise SystemExit(main())
