"""The device and operator pages as HTML, without a warehouse: what a reader is told."""

from __future__ import annotations

from datetime import date

from pipelines.report.beyond import operators_page, overview_section, render_devices

AS_OF = date(2025, 6, 30)
LABELS = {"cement_leak": "Cement leakage (any)"}


def _product(name: str, signal: date | None) -> dict:
    return {"product": name, "kind": "balloon", "metric": "cement_leak", "procedures": 200,
            "events": 40, "expected": 20.0, "observed_expected": 2.0, "statistic": 1.5,
            "threshold": 5.0, "signal_date": signal, "device_failures": 1, "as_of": AS_OF}


def test_a_backfilled_report_shows_no_later_device_figures():
    products = [_product("VERTOBAL-15", date(2025, 3, 1))]
    pages = render_devices(products, [], LABELS, set(), as_of=date(2024, 12, 31))
    assert list(pages) == ["devices.html"]
    assert "VERTOBAL-15" not in pages["devices.html"]
    assert "newest monitor run only (as of 2025-06-30)" in pages["devices.html"]
    section = overview_section(products, [], LABELS, date(2024, 12, 31))
    assert "No device charts for this date" in section and "VERTOBAL-15" not in section


def test_product_rows_state_signal_strength_and_rates():
    pages = render_devices([_product("VERTOBAL-15", date(2025, 3, 1)),
                            _product("STABILIT-BT", None)], [], LABELS, set(), as_of=AS_OF)
    page = pages["devices.html"]
    assert "1 of 2 product charts and 0 of 0 cement lots signalled" in page
    flagged = page[page.index("id='product-VERTOBAL-15"):]
    flagged = flagged[:flagged.index("</tr>")]
    assert "last signal 2025-03-01" in flagged and "CUSUM now 1.50, threshold 5.00" in flagged
    assert "20.0%" in flagged and "10.0%" in flagged  # rate and expected rate
    assert "devices-cement_leak.csv" in pages and "<desc" in page


def test_old_extracts_without_devices_get_a_plain_sentence():
    page = render_devices([], [], LABELS, set(), as_of=AS_OF)["devices.html"]
    assert "No product or cement lot has been charted" in page


def test_operator_page_names_the_method_and_marks_the_signal():
    row = {"operator": "OP-0123456789", "metric": "cement_leak", "method": "fir_cusum",
           "procedures": 30, "events": 9, "expected": 3.0, "statistic": 0.4, "threshold": 3.1,
           "signal_date": date(2025, 2, 2), "signal_procedure": 21,
           "first_procedure_date": date(2024, 6, 1)}
    page = operators_page("S001", [row, {**row, "operator": "OP-abcdefabcd",
                                         "signal_date": None}], LABELS)
    assert "1 of 2 operators at S001 signalled: OP-0123456789." in page
    assert "risk-adjusted CUSUM with head start (FIR)" in page
    assert "at the operator&#x27;s procedure 21" in page
    assert page.count("<tr class='flag'") == 1
