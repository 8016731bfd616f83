"""Developer sessions.

    nox -s tests     # the whole suite on CPU (what CI runs), slow SmolLM2 tests included
    nox -s fast      # unit + tiny-model integration tests only
    nox -s demo      # the two-round study on SmolLM2-135M-Instruct, tracked under results/

Sessions reuse the current environment (set it up as the README says first) so that
torch is never re-resolved into a multi-GB CUDA build.
"""

import nox

nox.options.default_venv_backend = "none"
nox.options.sessions = ["tests"]


@nox.session
def tests(session):
    session.run("python", "-m", "pytest", "-m", "not gpu", *session.posargs)


@nox.session
def fast(session):
    session.run("python", "-m", "pytest", "-m", "not slow and not gpu", *session.posargs)


@nox.session
def demo(session):
    session.run("python", "-m", "harness", "run", "configs/two_round.yaml", *session.posargs)
