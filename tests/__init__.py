"""The test suite, a package: a regular ``tests`` package in site-packages (latex2sympy2, which
lmms-eval pulls in, installs one) would otherwise win over this folder in
``from tests.helpers import ...``."""
