"""The promptable engine on a real CT with the real LiteMedSAM weights: geometry, propagation, caching, clicks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from FMSegCore.bench.prompt_bench import corrective_click, dice, interior_voxel
from FMSegCore.bench.simulated_curves import scribble_on_slice
from FMSegCore.engines.prompting.session import PromptSession, PropagationSettings
from FMSegCore.errors import InputError
from FMSegCore.io.volume import read_volume
from FMSegCore.models.factory import load_model
from FMSegCore.prompts import BoxPrompt, CurvePrompt, PointPrompt, SegmentPrompts, rasterise_curve
from FMSegCore.zoo.cache import resources_dir

CASE = resources_dir() / "SampleData" / "ct_abdomen_pelvis"


@pytest.fixture(scope="module")
def case():
    image = read_volume(CASE / "image.nii.gz")
    labels = read_volume(CASE / "label.nii.gz", allow_empty=True).array
    names = {v: int(k) for k, v in json.loads((CASE / "labels.json").read_text()).items()}
    return image, labels, names


@pytest.fixture(scope="module")
def session(case):
    return PromptSession(case[0], load_model("litemedsam", "cpu"), "cpu")


def _middle_box_prompt(mask):
    """A tight 2D box on the middle slice of a structure."""
    slices = np.flatnonzero(mask.any(axis=(1, 2)))
    middle = int(slices[len(slices) // 2])
    r0, c0, r1, c1 = _box(mask[middle])
    return slices, BoxPrompt((c0, r0, middle), (c1, r1, middle))


def _box(mask2d):
    rows, cols = np.flatnonzero(mask2d.any(1)), np.flatnonzero(mask2d.any(0))
    return rows[0], cols[0], rows[-1], cols[-1]


def test_box_prompt_segments_the_structure_inside_it(session, case):
    _, labels, names = case
    kidney = labels == names["kidney_left"]
    k = int(np.flatnonzero(kidney.any(axis=(1, 2)))[10])
    r0, c0, r1, c1 = _box(kidney[k])
    mask, quality, _ = session.decode_slice(2, k, (r0, c0, r1, c1))
    assert dice(mask, kidney[k]) > 0.8
    assert not mask[:, : max(c0 - 3, 0)].any()  # nothing far left of the box
    assert 0.0 < quality <= 1.5


def test_rois_limit_slices_and_results_are_cached(session, case):
    _, labels, names = case
    kidney = labels == names["kidney_left"]
    kk, jj, ii = np.nonzero(kidney)
    first, last = int(kk.min()) + 5, int(kk.min()) + 9  # a ROI over 5 slices of the kidney
    roi = BoxPrompt((ii.min(), jj.min(), first), (ii.max(), jj.max(), last))
    mask = session.segment(SegmentPrompts("kidney_left", boxes=[roi]))
    covered = np.flatnonzero(mask.any(axis=(1, 2)))
    assert covered.min() >= first and covered.max() <= last and len(covered) == 5
    assert dice(mask[first:last + 1], kidney[first:last + 1]) > 0.8
    encoded = session.timings.encoded
    decoded = session.timings.decoded
    again = session.segment(SegmentPrompts("kidney_left", boxes=[roi]))
    assert np.array_equal(again, mask)
    assert (session.timings.encoded, session.timings.decoded) == (encoded, decoded)  # nothing re-runs
    k = first + 2
    rows, cols = np.nonzero(mask[k])
    click = PointPrompt((float(cols.mean()), float(rows.mean()), k), include=False)
    session.segment(SegmentPrompts("kidney_left", boxes=[roi], points=[click]))
    assert session.timings.encoded == encoded  # a corrective click runs only the decoder...
    # ...on its own slice, then on the ROI's other slices it carries to (4 at most here), each once
    assert decoded + 1 < session.timings.decoded <= decoded + 1 + (last - first)


def test_2d_box_propagates_through_the_structure_and_stops(session, case):
    _, labels, names = case
    spleen = labels == names["spleen"]
    slices, box = _middle_box_prompt(spleen)
    mask = session.segment(SegmentPrompts("spleen", boxes=[box]))
    covered = np.flatnonzero(mask.any(axis=(1, 2)))
    assert len(covered) >= 0.7 * len(slices)
    assert covered.min() >= slices.min() - 3  # stopped near where the spleen ends
    assert dice(mask, spleen) > 0.8


def test_exclude_click_removes_what_it_points_at(session, case):
    _, labels, names = case
    liver = labels == names["liver"]
    k = int(np.flatnonzero(liver.any(axis=(1, 2)))[20])
    box = _box(liver[k])
    before, _, _ = session.decode_slice(2, k, box)
    rows, cols = np.nonzero(before)
    row, col = int(rows[len(rows) // 2]), int(cols[len(cols) // 2])
    after, _, _ = session.decode_slice(2, k, box, [PointPrompt((col, row, k), include=False)])
    assert before[row, col] and not after[row, col]


def test_corrective_clicks_do_not_lower_dice_on_a_hard_structure(session, case):
    _, labels, names = case
    pancreas = labels == names["pancreas"]
    prompts = SegmentPrompts("pancreas", boxes=[_middle_box_prompt(pancreas)[1]])
    scores = [dice(session.segment(prompts), pancreas)]
    for _ in range(3):
        click = corrective_click(session.results["pancreas"], pancreas)
        prompts = SegmentPrompts("pancreas", boxes=prompts.boxes, points=[*prompts.points, click])
        scores.append(dice(session.segment(prompts), pancreas))
    assert scores[-1] > scores[0]


def test_multi_label_run_and_empty_prompt_error(session, case):
    _, labels, names = case
    kidney = labels == names["kidney_left"]
    kk, jj, ii = np.nonzero(kidney)
    k = int(np.median(kk))
    one = SegmentPrompts("a", boxes=[BoxPrompt((ii.min(), jj.min(), k), (ii.max(), jj.max(), k + 1))])
    two = SegmentPrompts("b", boxes=[BoxPrompt((ii.min(), jj.min(), k + 2), (ii.max(), jj.max(), k + 3))])
    result, names_out = session.run([one, two])
    assert names_out == ["a", "b"]
    assert set(np.unique(result)) == {0, 1, 2}
    assert result.shape == labels.shape
    with pytest.raises(InputError, match="no box and no include point"):
        session.segment(SegmentPrompts("empty", points=[PointPrompt((1, 1, 1), include=False)]))


def test_include_click_on_the_first_slice_beyond_the_structure_stays_in_the_volume(session, case):
    _, labels, names = case
    kidney = labels == names["kidney_left"]
    kk, jj, ii = np.nonzero(kidney)
    k = int(kk.min()) + 3
    roi = BoxPrompt((ii.min(), jj.min(), k), (ii.max(), jj.max(), k + 1))
    rows, cols = np.nonzero(kidney[0]) if kidney[0].any() else (np.array([jj.mean()]), np.array([ii.mean()]))
    click = PointPrompt((float(cols.mean()), float(rows.mean()), 0.0), include=True)
    mask = session.segment(SegmentPrompts("kidney_left", boxes=[roi], points=[click]))
    assert mask[0].any() and mask[k].any()


def test_overlaps_go_to_the_more_confident_segment_whatever_the_order(session, case):
    _, labels, names = case
    stomach, pancreas = labels == names["stomach"], labels == names["pancreas"]
    common = np.flatnonzero(stomach.any(axis=(1, 2)) & pancreas.any(axis=(1, 2)))
    k = int(common[np.argmax(pancreas[common].sum(axis=(1, 2)))])
    prompts = []
    for name, mask in (("stomach", stomach), ("pancreas", pancreas)):
        r0, c0, r1, c1 = _box(mask[k])
        prompts.append(SegmentPrompts(name, boxes=[BoxPrompt((c0 - 4, r0 - 4, k), (c1 + 4, r1 + 4, k))]))
    forward, _ = session.run(prompts)
    backward, _ = session.run(prompts[::-1])
    contested = session.results["stomach"] & session.results["pancreas"]
    assert contested.any()  # the padded boxes make the two claim common voxels
    assert np.array_equal(forward == 1, backward == 2) and np.array_equal(forward == 2, backward == 1)
    scores = [session.confidence(name, contested) for name in ("stomach", "pancreas")]
    winners = np.where(scores[0] >= scores[1], 1, 2)
    assert np.array_equal(forward[contested], winners)


def test_auto_window_keeps_soft_tissue_for_a_gas_filled_stomach_and_lung_for_lungs(case):
    from scipy import ndimage

    from FMSegCore.bench.cross_scenarios import sample_scan

    image, labels, names = case
    stomach = labels == names["stomach"]
    gas = image.array.astype(np.float32)
    gas[ndimage.binary_erosion(stomach)] = -1000.0  # the stomach's lumen full of gas, its wall kept
    gassy = PromptSession(image.with_array(gas.astype(image.array.dtype)), load_model("litemedsam", "cpu"), "cpu")
    k = int(np.argmax(stomach.sum(axis=(1, 2))))
    r0, c0, r1, c1 = _box(stomach[k])
    prompt = SegmentPrompts("stomach", boxes=[BoxPrompt((c0, r0, k), (c1, r1, k))])
    assert gassy.candidate_windows(prompt) == ["abdomen", "lung"]  # mostly air: the old rule took the lung window
    assert gassy.choose_window(prompt, 2) == "abdomen"
    chest = sample_scan("ct_chest_small")
    lung = chest.mask("right lung")
    k = int(np.argmax(lung.sum(axis=(1, 2))))
    r0, c0, r1, c1 = _box(lung[k])
    lungs = PromptSession(chest.volume, load_model("litemedsam", "cpu"), "cpu")
    assert lungs.choose_window(SegmentPrompts("lung", boxes=[BoxPrompt((c0, r0, k), (c1, r1, k))]), 2) == "lung"


def test_a_corrective_click_also_changes_the_neighbouring_slices(case):
    image, labels, names = case
    pancreas = labels == names["pancreas"]
    model = load_model("litemedsam", "cpu")
    k = int(np.argmax(pancreas.sum(axis=(1, 2))))
    r0, c0, r1, c1 = _box(pancreas[k])
    prompt = SegmentPrompts("pancreas", boxes=[BoxPrompt((c0, r0, k), (c1, r1, k))])
    changed = {}
    session = PromptSession(image, model, "cpu", settings=PropagationSettings())
    before = session.segment(prompt).copy()  # the reach applies to clicks only: one box result serves both
    for reach in (0, 8):  # one session: the propagation (and its embeddings) is shared, the clicks redone
        session.settings.click_reach_slices = reach
        on_slice = corrective_click(before[k:k + 1], pancreas[k:k + 1])  # a click on the prompted slice
        click = PointPrompt((on_slice.ijk[0], on_slice.ijk[1], float(k)), include=on_slice.include)
        after = session.segment(SegmentPrompts("pancreas", boxes=prompt.boxes, points=[click]))
        assert (before ^ after)[k].any()
        changed[reach] = {int(s) for s in np.flatnonzero((before ^ after).any(axis=(1, 2)))} - {k}
    assert not changed[0]  # without carrying, a click changes only its own slice
    assert changed[8]  # carried: the slices next to it are prompted again from the corrected one


def test_interactive_protocol_prompts_and_curve(session, case):
    from FMSegCore.bench.interactive_bench import dice_auc, first_prompts, run_protocol

    _, labels, names = case
    kidney = labels == names["kidney_left"]
    prompts = first_prompts("kidney_left", kidney)
    kk, jj, ii = np.nonzero(kidney)
    assert prompts["roi_3d"].boxes[0].lo == (ii.min(), jj.min(), kk.min())
    i, j, k = (int(v) for v in prompts["click"].points[0].ijk)
    assert kidney[k, j, i] and prompts["click"].points[0].include
    largest = prompts["box_2d_largest"].boxes[0]
    assert largest.slice_axis() == 2 and largest.lo[2] == int(np.argmax(kidney.sum(axis=(1, 2))))
    curve, seconds = run_protocol(session.segment, prompts["click"], kidney, corrections=2)
    assert len(curve) == len(seconds) and 1 <= len(curve) <= 3 and all(0 <= d <= 1 for d in curve)
    assert curve[0] == dice(session.segment(prompts["click"]), kidney)
    assert dice_auc([0.5]) == 0.5 and abs(dice_auc([0.0, 1.0, 1.0]) - 0.75) < 1e-9


def test_clicks_apply_one_by_one_and_a_new_click_applies_only_itself(session, case):
    """Clicks added one at a time give the same voxels as all of them at once in a fresh session, and the
    last click re-decodes only what it changes (not every click before it again)."""
    image, labels, names = case
    spleen = labels == names["spleen"]
    from FMSegCore.bench.interactive_bench import first_prompts

    prompt = first_prompts("spleen", spleen)["roi_3d"]
    prediction = session.segment(prompt)
    for _ in range(3):
        prompt = SegmentPrompts("spleen", boxes=prompt.boxes, points=[*prompt.points, corrective_click(prediction,
                                                                                                        spleen)])
        decoded = session.timings.decoded
        prediction = session.segment(prompt)
    last_click = session.timings.decoded - decoded
    fresh = PromptSession(image, session.model, "cpu")
    fresh.cache = session.cache  # same embeddings: only the decoder calls are counted
    fresh.segment(SegmentPrompts("spleen", boxes=prompt.boxes))
    decoded = fresh.timings.decoded
    assert np.array_equal(fresh.segment(prompt), prediction)
    assert last_click < fresh.timings.decoded - decoded  # three clicks from the propagation cost more than one


def test_an_include_click_on_a_missed_part_grows_the_structure_in_3d(session, case):
    """From one click the spleen is found too small; an include click in the missed part enlarges that slice
    and its neighbours (they may grow beyond their old boxes), not only the clicked slice."""
    _, labels, names = case
    spleen = labels == names["spleen"]
    from FMSegCore.bench.interactive_bench import first_prompts

    prompt = first_prompts("spleen", spleen)["click"]
    before = session.segment(prompt).copy()
    click = corrective_click(before, spleen)
    assert click.include
    after = session.segment(SegmentPrompts("spleen", points=[*prompt.points, click]))
    k = int(round(click.ijk[2]))
    grown = {int(s) for s in np.flatnonzero((after & ~before).any(axis=(1, 2)))}
    assert grown - {k}  # neighbouring slices grew too
    assert dice(after, spleen) > dice(before, spleen) + 0.1


# ------------------------------------------------------------------------------------------------ curves


def _drawn(kind: str, mask: np.ndarray, **options) -> CurvePrompt:
    """The benchmark's scribble (or lasso) on the slice of the structure's most interior voxel."""
    return scribble_on_slice(mask, *interior_voxel(mask), closed=kind == "lasso", **options)


def test_a_scribble_seeds_a_structure_far_better_than_one_click(session, case):
    _, labels, names = case
    kidney = labels == names["kidney_left"]
    scribble = _drawn("scribble", kidney)
    k, j, i = interior_voxel(kidney)
    click = dice(session.segment(SegmentPrompts("kidney click", points=[PointPrompt((i, j, k))])), kidney)
    scribbled = dice(session.segment(SegmentPrompts("kidney scribble", curves=[scribble])), kidney)
    assert scribbled > 0.85 and scribbled > click + 0.2  # measured: 0.945 against 0.550
    # A click on the scribble's own slice corrects the result: it does not seed the segment again (that took a
    # new propagation, and could re-choose the CT window: the bundled CT's spleen fell from 0.93 to 0.08).
    k = scribble.slice_index(2)
    rows, cols = np.nonzero(kidney[k])
    decoded = session.timings.decoded
    session.segment(SegmentPrompts("kidney scribble", curves=[scribble],
                                   points=[PointPrompt((float(cols[0]), float(rows[0]), k))]))
    assert session.timings.decoded - decoded <= 1 + 4 + 2 * 8 < kidney.any(axis=(1, 2)).sum()


def test_a_scribbles_points_correct_together_and_an_exclude_scribble_removes_what_it_covers(session, case):
    _, labels, names = case
    kidney = labels == names["kidney_left"]
    kk, jj, ii = np.nonzero(kidney)
    first, last = int(kk.min()) + 5, int(kk.min()) + 9
    roi = BoxPrompt((ii.min(), jj.min(), first), (ii.max(), jj.max(), last))
    before = session.segment(SegmentPrompts("kidney roi", boxes=[roi]))
    k = first + 2
    rows, cols = np.nonzero(before[k])
    across = CurvePrompt(((cols.min() + 2.0, rows.mean(), k), (cols.max() - 2.0, rows.mean(), k)), include=False)
    assert len(across.sample(case[0].spacing)) >= 5
    decoded = session.timings.decoded
    after = session.segment(SegmentPrompts("kidney roi", boxes=[roi], curves=[across]))
    # One correction for all its points: its slice once, then the ROI's other slices it carries to (4 at most).
    assert session.timings.decoded - decoded <= 1 + (last - first)
    assert not after[k][rasterise_curve(across, 2, after.shape[1:])].any()
    assert before[k][rasterise_curve(across, 2, after.shape[1:])].any()


def test_a_lasso_bounds_its_slice_and_reaches_the_model_as_a_mask(session, case):
    image, labels, names = case
    spleen = labels == names["spleen"]
    lasso = _drawn("lasso", spleen)
    k = lasso.slice_index(2)
    fill = rasterise_curve(lasso, 2, spleen.shape[1:])
    mask = session.segment(SegmentPrompts("spleen lasso", curves=[lasso]))
    assert dice(mask, spleen) > 0.85  # measured: 0.949
    assert not (mask[k] & ~ndimage.binary_dilation(fill, iterations=2)).any()
    plain = PromptSession(image, session.model, "cpu", settings=PropagationSettings(lasso_mask_prompt=False))
    plain.cache = session.cache
    assert not np.array_equal(plain.segment(SegmentPrompts("spleen lasso", curves=[lasso])), mask)
    inner = CurvePrompt(tuple((i, j, k) for i, j, _ in lasso.points[::2]), include=False, closed=True)
    cut = session.segment(SegmentPrompts("spleen lasso", curves=[lasso, inner]))
    assert not cut[k][rasterise_curve(inner, 2, spleen.shape[1:])].any()
    assert np.array_equal(np.delete(cut, k, axis=0), np.delete(mask, k, axis=0))  # only its slice changes


def test_a_curve_across_slices_is_refused_naming_its_file_and_the_axis(session, case):
    _, labels, names = case
    kidney = labels == names["kidney_left"]
    k, j, i = interior_voxel(kidney)
    slanted = CurvePrompt(((i - 3.0, j - 2.0, k - 1.0), (i + 3.0, j + 2.0, k + 1.0)), source="slanted.mrk.json",
                          label="s")  # flat along no axis (flat along J, it would slice the segment along J)
    with pytest.raises(InputError) as caught:
        session.segment(SegmentPrompts("kidney slanted", curves=[slanted]))
    message = str(caught.value)
    assert message.startswith("slanted.mrk.json: ") and "K axis" in message and "\n" not in message
