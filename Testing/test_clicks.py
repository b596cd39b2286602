"""Corrective clicks are binding on a slice's mask."""

from __future__ import annotations

import numpy as np

from FMSegCore.engines.prompting.clicks import apply_clicks, refine_with_clicks


def _square(shape, r0, c0, r1, c1):
    mask = np.zeros(shape, dtype=bool)
    mask[r0:r1, c0:c1] = True
    return mask


def test_exclude_click_on_a_stray_part_removes_only_that_part():
    body = _square((40, 40), 5, 5, 25, 25)
    stray = _square((40, 40), 30, 30, 34, 34)
    result = refine_with_clicks(body | stray, body | stray, [(32, 32, False)])
    assert np.array_equal(result, body)


def test_exclude_click_in_the_body_when_the_model_drops_it_removes_a_disc_around_the_click():
    body = _square((40, 40), 5, 5, 25, 25)
    result = refine_with_clicks(body, np.zeros_like(body), [(15, 20, False)])
    assert not result[15, 20]
    assert result[15, 6] and result.sum() > 0.5 * body.sum()


def test_exclude_click_in_the_body_follows_the_models_reshaped_answer():
    body = _square((40, 40), 5, 5, 25, 25)
    proposal = _square((40, 40), 5, 5, 25, 18)  # the model, seeing the click, keeps the left part
    result = refine_with_clicks(body, proposal, [(15, 22, False)])
    assert np.array_equal(result, proposal)


def test_include_click_adds_the_proposed_region_under_it_and_keeps_the_rest():
    body = _square((40, 40), 5, 5, 15, 15)
    missed = _square((40, 40), 25, 25, 35, 35)
    wrong = _square((40, 40), 0, 30, 4, 39)
    result = refine_with_clicks(body, missed | wrong, [(30, 30, True)])
    assert np.array_equal(result, body | missed)


def test_apply_clicks_sets_clicked_pixels_and_protects_included_regions():
    body = _square((20, 20), 2, 2, 10, 10)
    out = apply_clicks(body, [(15, 15, True), (5, 5, False)])
    assert out[15, 15] and not out[5, 5] and out.sum() == 1
    protected = apply_clicks(body, [(4, 4, True), (5, 5, False)])
    assert protected[4, 4] and not protected[5, 5] and protected.sum() == body.sum() - 1
