"""Compare two runs of nipype's interface suite: as shipped, and with wrapped classes.

``python tests/nipype_suite/compare.py shipped.xml wrapped.xml`` reads the two JUnit
reports, prints the counts of each run and every test that passed as shipped but did
not pass (or did not run) wrapped, and exits with status 1 if there is any.

>>> shipped = {'a': 'passed', 'b': 'failed', 'c': 'passed'}
>>> regressions(shipped, {'a': 'passed', 'b': 'passed'})
{'c': 'missing'}
"""

from __future__ import annotations

import collections
import sys
import xml.etree.ElementTree as ET

OUTCOMES = ('passed', 'failed', 'error', 'skipped')


def outcomes(report: str) -> dict[str, str]:
    """Outcome of every test case in a JUnit XML report, by test id."""
    found = {}
    for case in ET.parse(report).getroot().iter('testcase'):
        test_id = f'{case.get("classname")}::{case.get("name")}'
        kinds = {child.tag for child in case}
        outcome = next((o for o in ('error', 'failure', 'skipped') if o in kinds), 'passed')
        found[test_id] = 'failed' if outcome == 'failure' else outcome
    return found


def counts(results: dict[str, str]) -> str:
    """``'2331 passed, 8 failed, 0 error, 251 skipped'``-style summary."""
    tally = collections.Counter(results.values())
    return ', '.join(f'{tally[o]} {o}' for o in OUTCOMES)


def regressions(shipped: dict[str, str], wrapped: dict[str, str]) -> dict[str, str]:
    """Tests that pass as shipped and not wrapped, with their wrapped outcome."""
    return {
        test: wrapped.get(test, 'missing')
        for test, outcome in shipped.items()
        if outcome == 'passed' and wrapped.get(test) != 'passed'
    }


def main(argv: list[str]) -> int:
    shipped_report, wrapped_report = argv
    shipped, wrapped = outcomes(shipped_report), outcomes(wrapped_report)
    print(f'nipype interface suite, as shipped:          {counts(shipped)}')
    print(f'nipype interface suite, image-aware classes: {counts(wrapped)}')
    lost = regressions(shipped, wrapped)
    for test, outcome in sorted(lost.items()):
        print(f'  passes as shipped, {outcome} wrapped: {test}')
    if lost:
        print(f'{len(lost)} tests pass as shipped but not with image-aware classes')
        return 1
    print('every test that passes as shipped passes with image-aware classes')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
