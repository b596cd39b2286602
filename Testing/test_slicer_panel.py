"""The Slicer module panel: stand-in tests under PySide6 offscreen; they do not replace a run inside Slicer.

What runs for real here: the module's ``Resources/UI/FMSegSlicer.ui`` loaded by Qt's ``QUiLoader`` (Slicer's custom
widgets replaced by the Python stand-ins of ``Testing/qt_standins.py``), ``FMSegSlicerLib/panel.py``'s
``PanelController`` on those widgets with PySide6's ``true_property`` switched on for panel.py (as PythonQt
exposes Qt properties), Qt timers and signals, ``concurrent.futures`` threads, and MRML nodes from slicer-core.

What does not: PythonQt, CTK and qMRML widgets, the parameter node binding (``FMSegSlicer.py`` cannot be imported
without Slicer: its parameter node class is read with ``ast`` and checked against the ``.ui``), place mode in
views, and the Logic's work (a worker process). The Logic is replaced by ``LogicTestDouble``, a test double
whose ``submit`` is real (a ``ThreadPoolExecutor``, returning Futures as the Logic's contract says), whose
``*_async`` variants (when switched on) return the Logic's own ``Pending`` (imported from logic.py), and whose
methods run the small functions each test passes; the tests that drive the real Logic through the panel are
separate. ``FMSegSlicerTest`` in ``FMSegSlicer.py`` covers the panel and the Logic inside Slicer.

This module's own code keeps plain PySide6 (no feature), so it reads the widgets back through Qt's getters
(``isEnabled()``, ``text()``): a property assignment in panel.py that did not reach Qt shows up as a failure.
"""

from __future__ import annotations

import os

os.environ["QT_QPA_PLATFORM"] = "offscreen"  # before Qt starts

import ast  # noqa: E402
import inspect  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import xml.etree.ElementTree as ET  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from FMSegCore.engines.adaptation.defaults import DEFAULT_METHODS, DEFAULT_RANK, MAX_RANK, METHOD_CHOICES  # noqa: E402
from FMSegCore.progress import Progress  # noqa: E402

pytest.importorskip("PySide6")
pytest.importorskip("PySide6.QtUiTools")

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "FMSegSlicer"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "FMSegSlicer.ui"
MODULE_FILE = MODULE_DIR / "FMSegSlicer.py"
PANEL_FILE = MODULE_DIR / "FMSegSlicerLib" / "panel.py"
LOGIC_FILE = MODULE_DIR / "FMSegSlicerLib" / "logic.py"
for path in (ROOT / "Testing", MODULE_DIR):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import qt_standins  # noqa: E402
from PySide6 import QtCore, QtWidgets  # noqa: E402
from slicer_parameter_node import parameter_node_fields  # noqa: E402

qt_standins.set_features(__name__)  # this module: plain PySide6, Qt getters

PANEL_MODULE = "FMSegSlicerLib.panel"

#: The panel's contract: object name -> (class, section it sits in).
CONTRACT = {
    "inputsCollapsibleButton": ("ctkCollapsibleButton", None),
    "inputVolumeSelector": ("qMRMLNodeComboBox", "inputsCollapsibleButton"),
    "segmentationSelector": ("qMRMLNodeComboBox", "inputsCollapsibleButton"),
    "segmentNameEdit": ("QLineEdit", "inputsCollapsibleButton"),
    "promptModelSelector": ("QComboBox", "inputsCollapsibleButton"),
    "incontextModelSelector": ("QComboBox", "inputsCollapsibleButton"),
    "deviceSelector": ("QComboBox", "inputsCollapsibleButton"),
    "serverUrlEdit": ("QLineEdit", "inputsCollapsibleButton"),
    "serverTokenEdit": ("QLineEdit", "inputsCollapsibleButton"),
    "connectButton": ("QPushButton", "inputsCollapsibleButton"),
    "downloadModelButton": ("QPushButton", "inputsCollapsibleButton"),
    "importWeightsButton": ("QPushButton", "inputsCollapsibleButton"),
    "downloadProgressBar": ("QProgressBar", "inputsCollapsibleButton"),
    "statusLabel": ("QLabel", "inputsCollapsibleButton"),
    "promptCollapsibleButton": ("ctkCollapsibleButton", None),
    "includePointsPlaceWidget": ("qSlicerMarkupsPlaceWidget", "promptCollapsibleButton"),
    "excludePointsPlaceWidget": ("qSlicerMarkupsPlaceWidget", "promptCollapsibleButton"),
    "boxButton": ("QPushButton", "promptCollapsibleButton"),
    "roiButton": ("QPushButton", "promptCollapsibleButton"),
    "scribbleButton": ("QPushButton", "promptCollapsibleButton"),
    "excludeScribbleButton": ("QPushButton", "promptCollapsibleButton"),
    "lassoButton": ("QPushButton", "promptCollapsibleButton"),
    "excludeLassoButton": ("QPushButton", "promptCollapsibleButton"),
    "autoUpdateCheckBox": ("QCheckBox", "promptCollapsibleButton"),
    "segmentButton": ("QPushButton", "promptCollapsibleButton"),
    "undoButton": ("QPushButton", "promptCollapsibleButton"),
    "clearPromptsButton": ("QPushButton", "promptCollapsibleButton"),
    "promptAdapterCheckBox": ("QCheckBox", "promptCollapsibleButton"),
    "incontextCollapsibleButton": ("ctkCollapsibleButton", None),
    "supportVolumeSelector": ("qMRMLNodeComboBox", "incontextCollapsibleButton"),
    "supportSegmentationSelector": ("qMRMLNodeComboBox", "incontextCollapsibleButton"),
    "addSupportButton": ("QPushButton", "incontextCollapsibleButton"),
    "removeSupportButton": ("QPushButton", "incontextCollapsibleButton"),
    "supportTable": ("QTableWidget", "incontextCollapsibleButton"),
    "supportSizeSpinBox": ("QSpinBox", "incontextCollapsibleButton"),
    "ensembleSpinBox": ("QSpinBox", "incontextCollapsibleButton"),
    "candidatesSpinBox": ("QSpinBox", "incontextCollapsibleButton"),
    "uncertaintyCheckBox": ("QCheckBox", "incontextCollapsibleButton"),
    "runInContextButton": ("QPushButton", "incontextCollapsibleButton"),
    "saveTaskButton": ("QPushButton", "incontextCollapsibleButton"),
    "loadTaskButton": ("QPushButton", "incontextCollapsibleButton"),
    "clearTaskButton": ("QPushButton", "incontextCollapsibleButton"),
    "taskLabel": ("QLabel", "incontextCollapsibleButton"),
    "adaptCollapsibleButton": ("ctkCollapsibleButton", None),
    "caseVolumeSelector": ("qMRMLNodeComboBox", "adaptCollapsibleButton"),
    "caseSegmentationSelector": ("qMRMLNodeComboBox", "adaptCollapsibleButton"),
    "addCaseButton": ("QPushButton", "adaptCollapsibleButton"),
    "removeCaseButton": ("QPushButton", "adaptCollapsibleButton"),
    "caseTable": ("QTableWidget", "adaptCollapsibleButton"),
    "adaptModeSelector": ("QComboBox", "adaptCollapsibleButton"),
    "methodSelector": ("QComboBox", "adaptCollapsibleButton"),
    "rankSpinBox": ("QSpinBox", "adaptCollapsibleButton"),
    "stepsSpinBox": ("QSpinBox", "adaptCollapsibleButton"),
    "adaptButton": ("QPushButton", "adaptCollapsibleButton"),
    "cancelButton": ("QPushButton", "adaptCollapsibleButton"),
    "adaptProgressBar": ("QProgressBar", "adaptCollapsibleButton"),
    "saveAdapterButton": ("QPushButton", "adaptCollapsibleButton"),
    "loadAdapterButton": ("QPushButton", "adaptCollapsibleButton"),
    "adapterLabel": ("QLabel", "adaptCollapsibleButton"),
    "segmentWithAdapterButton": ("QPushButton", "adaptCollapsibleButton"),
}
METHODS = list(METHOD_CHOICES)
MRML_WIDGETS = ("qMRMLNodeComboBox", "qSlicerMarkupsPlaceWidget", "qMRMLSegmentSelectorWidget")


# --------------------------------------------------------------------------------------------------------------------
# Helpers and fixtures


def class_name(widget) -> str:
    """The stand-in's Python class name, or the Qt class name of a Qt widget."""
    if type(widget).__module__ == qt_standins.__name__:
        return type(widget).__name__
    return widget.metaObject().className()


def section_of(widget) -> str | None:
    parent = widget.parentWidget()
    while parent is not None:
        if class_name(parent) == "ctkCollapsibleButton":
            return parent.objectName()
        parent = parent.parentWidget()
    return None


def combo_items(combo) -> list[str]:
    return [combo.itemText(i) for i in range(combo.count())]


def table_rows(table) -> list[tuple[str, ...]]:
    return [tuple(table.item(r, c).text() if table.item(r, c) else "" for c in range(table.columnCount()))
            for r in range(table.rowCount())]


def wait_until(predicate, timeout=5.0, what="condition"):
    """Process Qt events (timers fire, the GUI stays live) until ``predicate()`` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        QtWidgets.QApplication.processEvents()
        if predicate():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def app():
    return qt_standins.application()


@pytest.fixture(scope="module")
def panel(app):
    return qt_standins.import_with_true_property(PANEL_MODULE)


@pytest.fixture(autouse=True)
def slot_exceptions():
    """Exceptions raised in Qt slots (timer callbacks, button handlers) reach sys.excepthook, not the test: fail
    the test when there is one."""
    caught = []
    previous = sys.excepthook
    sys.excepthook = lambda *info: caught.append(info)
    try:
        yield caught
    finally:
        sys.excepthook = previous
    assert not caught, f"exception in a Qt slot: {caught[0][1]!r}"


@pytest.fixture
def widget(app):
    warnings = []
    top = qt_standins.load_ui(UI_FILE, warnings)
    top.load_warnings = warnings
    yield top
    top.deleteLater()
    QtWidgets.QApplication.processEvents()


@pytest.fixture
def ui(widget):
    return qt_standins.child_widget_variables(widget)


@pytest.fixture(scope="module")
def mrml():
    """Real MRML (slicer-core): a scene with the Markups and Segmentations logics, as Slicer sets it up."""
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the 'slicer' module here is not slicer-core")
    from slicer_scene import new_scene

    scene = new_scene()

    class Mrml:
        def volume(self, name):
            return scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)

        def segmentation(self, name, segments=()):
            node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
            for segment in segments:
                node.GetSegmentation().AddEmptySegment(segment.replace(" ", "_"), segment)
            return node

        def points(self, name):
            return scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)

        def roi(self, name):
            return scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)

    mrml = Mrml()
    mrml.scene = scene
    return mrml


class Cancelled(Exception):
    """Stands for the Logic's ``Cancelled`` (the controller recognises it by its class name)."""


def logic_module():
    """FMSegSlicerLib.logic (real MRML via slicer-core, no worker started), or skip."""
    pytest.importorskip("slicer")
    try:
        import FMSegSlicerLib.logic as logic
    except Exception as error:  # pragma: no cover - depends on the environment
        pytest.skip(f"FMSegSlicerLib.logic cannot be imported here: {error}")
    return logic


class LogicTestDouble:
    """Test double of the Logic (``FMSegSlicerLib.logic.FMSegLogic``), for the controller's job handling.

    ``submit`` is real: a ThreadPoolExecutor runs the function off the GUI thread and returns its Future. The
    Logic's methods keep the Logic's signatures (a wrong keyword from the controller fails) and run the functions
    the test passes by name; ``calls`` records (name, arguments, thread). With ``async_variants``, it also has the
    Logic's ``*_async`` methods, returning the Logic's real ``Pending``: the test's function runs in the background
    and ``Pending.result()`` "applies" it (records the applying thread, as the Logic writes MRML there)."""

    ASYNC = ("prompt", "run_incontext", "adapt", "segment_with_adapter", "run_task", "save_task", "import_weights")

    def __init__(self, async_variants=False, **functions):
        self.executor = ThreadPoolExecutor(max_workers=4)
        self.functions = {"connect": lambda **kw: {"version": "test", "device": "cpu", "models": []},
                          "models": lambda: []}
        self.functions.update(functions)
        self.calls = []
        self.applied = []  # (name, thread) of each Pending applied
        if async_variants:
            pending = logic_module().Pending
            for name in self.ASYNC:
                setattr(self, f"{name}_async", self._async_variant(name, pending))

    def _async_variant(self, name, pending):
        blocking = getattr(self, name)

        def variant(*args, **kwargs):
            self.calls.append((f"{name}_async", {}, threading.current_thread()))  # the "prepare" phase
            future = self.submit(blocking, *args, **kwargs)

            def apply(value):
                self.applied.append((name, threading.current_thread()))
                return value

            return pending(future, apply)

        return variant

    def submit(self, function, *args, **kwargs):
        return self.executor.submit(function, *args, **kwargs)

    def _call(self, name, **arguments):
        self.calls.append((name, arguments, threading.current_thread()))
        if name not in self.functions:
            raise NotImplementedError(f"LogicTestDouble.{name} was not given by this test")
        return self.functions[name](**arguments)

    def called(self, name):
        return [arguments for call, arguments, _thread in self.calls if call == name]

    def connect(self, url="", token="", device=""):
        return self._call("connect", url=url, token=token, device=device)

    def models(self):
        return self._call("models")

    def download_model(self, model_id, progress=None, cancel=None):
        return self._call("download_model", model_id=model_id, progress=progress)

    def import_weights(self, model_id, path, replace=False):
        return self._call("import_weights", model_id=model_id, path=path, replace=replace)

    def prompt(self, volume_node, segmentation_node, segment_name, include_points=None, exclude_points=None,
               rois=(), model="litemedsam", use_adapter=False, include_curves=(), exclude_curves=()):
        return self._call("prompt", volume_node=volume_node, segmentation_node=segmentation_node,
                          segment_name=segment_name, include_points=include_points, exclude_points=exclude_points,
                          rois=rois, model=model, use_adapter=use_adapter, include_curves=include_curves,
                          exclude_curves=exclude_curves)

    def undo(self, segmentation_node):
        return self._call("undo", segmentation_node=segmentation_node)

    def run_incontext(self, volume_node, segmentation_node, supports, support_size=8, ensemble=1, uncertainty=False,
                      model="universeg-fmseg", progress=None, cancel=None, candidates=0):
        arguments = dict(volume_node=volume_node, segmentation_node=segmentation_node, supports=supports,
                         support_size=support_size, ensemble=ensemble, uncertainty=uncertainty, model=model,
                         progress=progress, cancel=cancel)
        return self._call("run_incontext", **arguments, **({"candidates": candidates} if candidates else {}))

    def run_task(self, volume_node, segmentation_node, uncertainty=False, progress=None, cancel=None):
        return self._call("run_task", volume_node=volume_node, segmentation_node=segmentation_node,
                          uncertainty=uncertainty, progress=progress, cancel=cancel)

    def save_task(self, supports, path, model="iris-fmseg", overwrite=False, progress=None, cancel=None):
        return self._call("save_task", supports=supports, path=path, model=model, overwrite=overwrite,
                          progress=progress, cancel=cancel)

    def load_task(self, path):
        return self._call("load_task", path=path)

    def clear_task(self):
        return self._call("clear_task")

    def adapt(self, cases, mode="auto", method=None, rank=DEFAULT_RANK, steps=0, progress=None, cancel=None):
        return self._call("adapt", cases=cases, mode=mode, method=method, rank=rank, steps=steps,
                          progress=progress, cancel=cancel)

    def save_adapter(self, path, overwrite=False):
        return self._call("save_adapter", path=path, overwrite=overwrite)

    def load_adapter(self, path):
        return self._call("load_adapter", path=path)

    def segment_with_adapter(self, volume_node, segmentation_node, progress=None, cancel=None):
        return self._call("segment_with_adapter", volume_node=volume_node, segmentation_node=segmentation_node,
                          progress=progress, cancel=cancel)

    def install_dependencies(self, report):
        return self._call("install_dependencies", report=report)


@pytest.fixture
def make_controller(panel, ui):
    """A PanelController on the loaded .ui with the given test double and hooks; shut down after the test."""
    made = []

    def make(logic, hooks=None):
        controller = panel.PanelController(ui, logic, qt_standins.make_qt(), hooks, pollIntervalMs=5)
        made.append((controller, logic))
        return controller

    yield make
    for controller, logic in made:
        controller.shutdown()
        logic.executor.shutdown(wait=True, cancel_futures=True)


def recording_hooks(panel, rois=(), curves=((), ())):
    """The real PanelHooks (node names and segments read from the MRML nodes), recording what the controller
    asks of the application."""

    class RecordingHooks(panel.PanelHooks):
        def __init__(self):
            self.errors, self.results, self.placing, self.cleared = [], [], [], 0

        def promptRois(self):
            return list(rois)

        def promptCurves(self):
            return list(curves[0]), list(curves[1])

        def showError(self, title, text):
            self.errors.append((title, text))

        def resultReady(self, kind, result):
            self.results.append((kind, result))

        def setPlacing(self, kind, enabled):
            self.placing.append((kind, enabled))

        def clearPrompts(self):
            self.cleared += 1

    return RecordingHooks()


def select_inputs(ui, mrml, segments=("liver",)):
    volume, segmentation = mrml.volume("CT"), mrml.segmentation("Labels", segments)
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.segmentationSelector.setCurrentNode(segmentation)
    return volume, segmentation


# --------------------------------------------------------------------------------------------------------------------
# The .ui file


def test_ui_has_every_contract_widget_with_its_class_and_section(widget):
    assert class_name(widget) == "qMRMLWidget" and widget.objectName() == "FMSegSlicer"
    assert widget.load_warnings == []
    for name, (cls, section) in CONTRACT.items():
        found = widget.findChild(QtWidgets.QWidget, name)
        assert found is not None, name
        assert class_name(found) == cls, name
        assert section_of(found) == section, name


def test_ui_widget_settings(ui):
    assert combo_items(ui.deviceSelector) == ["auto", "cuda", "cpu", "mps"]
    assert combo_items(ui.adaptModeSelector) == ["auto", "prompt"]
    assert combo_items(ui.methodSelector) == METHODS
    assert combo_items(ui.promptModelSelector) == ["litemedsam"]
    assert combo_items(ui.incontextModelSelector) == ["universeg-fmseg"]
    spins = {"supportSizeSpinBox": (1, 64, 8), "ensembleSpinBox": (1, 16, 1), "rankSpinBox": (1, MAX_RANK, DEFAULT_RANK),
             "stepsSpinBox": (0, 100_000, 0)}
    for name, expected in spins.items():
        spin = getattr(ui, name)
        assert (spin.minimum(), spin.maximum(), spin.value()) == expected, name
    assert ui.stepsSpinBox.specialValueText() == "method default"  # 0: the worker picks the method's steps
    assert ui.methodSelector.currentText() == DEFAULT_METHODS["auto"]
    assert ui.serverUrlEdit.placeholderText() == "local worker"
    assert ui.serverTokenEdit.echoMode() == QtWidgets.QLineEdit.EchoMode.Password
    assert ui.segmentNameEdit.text() == "Segment_1"
    assert ui.connectButton.text() == "Start / connect" and ui.downloadModelButton.text() == "Download model"
    assert ui.importWeightsButton.text() == "Import weights\u2026"
    assert "downloaded by hand" in ui.importWeightsButton.toolTip() and "licence-gated" in ui.importWeightsButton.toolTip()
    # off until a stochastic model is chosen; its range is set by the controller from the option
    assert not ui.candidatesSpinBox.isEnabled() and ui.candidatesSpinBox.specialValueText() == "off"
    assert ui.boxButton.isCheckable() and ui.boxButton.text() == "2D box"
    assert ui.roiButton.isCheckable() and ui.roiButton.text() == "3D ROI"
    curves = {"scribbleButton": ("Scribble", "s"), "excludeScribbleButton": ("Exclude scribble", "Shift+S"),
              "lassoButton": ("Lasso", "l"), "excludeLassoButton": ("Exclude lasso", "Shift+L")}
    for name, (text, key) in curves.items():
        button = getattr(ui, name)
        assert button.isCheckable() and button.text() == text and f"shortcut: {key})" in button.toolTip(), name
    assert ui.autoUpdateCheckBox.isChecked() and ui.autoUpdateCheckBox.text() == "Update after each prompt"
    assert ui.promptAdapterCheckBox.text() == "Use loaded adapter" and not ui.promptAdapterCheckBox.isChecked()
    texts = {"segmentButton": "Segment", "undoButton": "Undo", "clearPromptsButton": "Clear prompts",
             "runInContextButton": "Segment from support set", "adaptButton": "Adapt", "cancelButton": "Cancel",
             "segmentWithAdapterButton": "Segment with adapter", "saveTaskButton": "Save task\u2026",
             "loadTaskButton": "Load task\u2026", "clearTaskButton": "Clear task"}
    for name, text in texts.items():
        assert getattr(ui, name).text() == text, name
    assert not ui.cancelButton.isEnabled()
    for table in (ui.supportTable, ui.caseTable):
        headers = [table.horizontalHeaderItem(c).text() for c in range(table.columnCount())]
        assert headers == ["Volume", "Segmentation", "Segments"]
        assert table.rowCount() == 0
    for name in ("inputVolumeSelector", "supportVolumeSelector", "caseVolumeSelector"):
        assert getattr(ui, name).nodeTypes == ["vtkMRMLScalarVolumeNode"], name
    for name in ("segmentationSelector", "supportSegmentationSelector", "caseSegmentationSelector"):
        assert getattr(ui, name).nodeTypes == ["vtkMRMLSegmentationNode"], name
    assert ui.segmentationSelector.addEnabled and ui.segmentationSelector.renameEnabled
    assert not ui.inputVolumeSelector.addEnabled
    assert [ui.adaptProgressBar.maximum(), ui.downloadProgressBar.maximum()] == [100, 100]


def test_ui_connections_hand_the_scene_to_every_mrml_widget(widget):
    """As in Slicer's .ui files, the top widget's mrmlSceneChanged(vtkMRMLScene*) reaches setMRMLScene of each
    node selector and place widget. Qt made the connections from the signature strings without a warning
    (checked against the stand-ins' declared signatures); the stand-in cannot emit the C++ type, so the count of
    receivers is checked instead of the effect."""
    tree = ET.parse(UI_FILE)
    connections = [(c.findtext("sender"), c.findtext("signal"), c.findtext("receiver"), c.findtext("slot"))
                   for c in tree.getroot().iter("connection")]
    mrml_widgets = {w.get("name") for w in tree.getroot().iter("widget") if w.get("class") in MRML_WIDGETS}
    assert len(mrml_widgets) == 8
    assert sorted(c[2] for c in connections) == sorted(mrml_widgets)
    assert set((c[0], c[1], c[3]) for c in connections) == {
        ("FMSegSlicer", "mrmlSceneChanged(vtkMRMLScene*)", "setMRMLScene(vtkMRMLScene*)")}
    assert widget.load_warnings == []
    assert widget.receivers(QtCore.SIGNAL("mrmlSceneChanged(vtkMRMLScene*)")) == len(mrml_widgets)


def test_a_broken_ui_connection_is_reported(tmp_path, app):
    """Control for the test above: the warning capture does see a connection Qt cannot make."""
    broken = tmp_path / "broken.ui"
    broken.write_text(UI_FILE.read_text().replace("<slot>setMRMLScene(vtkMRMLScene*)</slot>",
                                                  "<slot>setMRMLScen(vtkMRMLScene*)</slot>", 1))
    warnings = []
    qt_standins.load_ui(broken, warnings).deleteLater()
    assert any("setMRMLScen" in w for w in warnings), warnings


# --------------------------------------------------------------------------------------------------------------------
# The parameter node (FMSegSlicer.py imports Slicer: its parameter node class runs on its own, slicer_parameter_node)


def test_slicer_parameter_names_are_the_parameter_node_fields(widget):
    fields = parameter_node_fields()
    assert list(fields) == ["inputVolume", "segmentation", "segmentName", "device", "serverUrl", "autoUpdate",
                            "useAdapterForPrompts", "supportSize", "ensemble", "uncertainty", "adaptMode", "method",
                            "rank", "steps"]
    bound = {w.property("SlicerParameterName"): w for w in widget.findChildren(QtWidgets.QWidget)
             if w.property("SlicerParameterName")}
    assert sorted(bound) == sorted(fields)
    expected_widget = {"inputVolume": "inputVolumeSelector", "segmentation": "segmentationSelector",
                       "segmentName": "segmentNameEdit", "device": "deviceSelector", "serverUrl": "serverUrlEdit",
                       "autoUpdate": "autoUpdateCheckBox", "useAdapterForPrompts": "promptAdapterCheckBox",
                       "supportSize": "supportSizeSpinBox", "ensemble": "ensembleSpinBox",
                       "uncertainty": "uncertaintyCheckBox", "adaptMode": "adaptModeSelector", "method": "methodSelector",
                       "rank": "rankSpinBox", "steps": "stepsSpinBox"}
    assert {name: w.objectName() for name, w in bound.items()} == expected_widget


def test_each_bound_widget_can_represent_its_parameter(widget):
    """The pairs Slicer's parameter node GUI connectors accept (slicer/parameterNodeWrapper/guiConnectors.py):
    QCheckBox-bool, QSpinBox-int, QLineEdit-str, QComboBox-str with a Choice annotation (the connector refills the
    combo box from the choices), qMRMLNodeComboBox-node class; ranges, choices and defaults agree with the .ui."""
    fields = parameter_node_fields()
    for w in widget.findChildren(QtWidgets.QWidget):
        name = w.property("SlicerParameterName")
        if not name:
            continue
        field, cls = fields[name], class_name(w)
        if cls == "QCheckBox":
            assert field["type"] == "bool" and field["default"] == w.isChecked(), name
        elif cls == "QSpinBox":
            assert field["type"] == "int", name
            assert field["range"] == (w.minimum(), w.maximum()), name
            assert field["default"] == w.value(), name
        elif cls == "QLineEdit":
            assert field["type"] == "str" and field["default"] == w.text(), name
        elif cls == "QComboBox":
            assert field["type"] == "str" and field["choices"] == combo_items(w), name
            assert field["default"] == w.currentText(), name
        elif cls == "qMRMLNodeComboBox":
            assert [field["type"]] == w.nodeTypes and field["default"] is None, name
        else:
            raise AssertionError(f"{name}: no parameter node connector for {cls}")
    # the adaptation settings are FMSegCore's (the .ui spells them as literals; test_options_schema checks the rest)
    assert fields["method"]["choices"] == list(METHOD_CHOICES)
    assert (fields["method"]["default"], fields["rank"]["default"]) == (DEFAULT_METHODS["auto"], DEFAULT_RANK)


# --------------------------------------------------------------------------------------------------------------------
# Code rules: names that exist, and code that runs under PythonQt


def test_the_code_uses_only_widget_names_of_the_ui(widget):
    names = {w.objectName() for w in widget.findChildren(QtWidgets.QWidget)}
    used = set(re.findall(r"\bself\.ui\.([A-Za-z_]\w*)", MODULE_FILE.read_text()))
    used |= set(re.findall(r"\bui\.([A-Za-z_]\w*)", PANEL_FILE.read_text()))
    assert used and used <= names, sorted(used - names)


PROPERTY_GETTERS = {"text", "isChecked", "isEnabled", "isVisible", "value", "currentText", "currentIndex",
                    "rowCount", "columnCount", "placeholderText", "isActive", "interval", "minimum", "maximum",
                    "checked", "enabled", "toolTip"}
PROPERTY_SETTERS = {"setText", "setEnabled", "setChecked", "setValue", "setRowCount", "setColumnCount",
                    "setCurrentIndex", "setCurrentText", "setMinimum", "setMaximum", "setInterval", "setVisible",
                    "setToolTip", "setPlaceModeEnabled"}


def _pythonqt_violations(path, forbid_setters):
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        attr = node.func.attr
        if attr in PROPERTY_GETTERS and not node.args and not node.keywords:
            found.append(f"{path.name}:{node.lineno} getter call .{attr}()")
        if forbid_setters and attr in PROPERTY_SETTERS:
            found.append(f"{path.name}:{node.lineno} property setter .{attr}()")
        if attr in ("connect", "disconnect") and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and "(" in node.args[0].value:  # "clicked(bool)"
            found.append(f"{path.name}:{node.lineno} signature-string connect")
    return found


def test_panel_and_module_code_follow_the_pythonqt_rules():
    """Properties as attributes, no getter calls (they fail in PythonQt), no signature-string connects (they fail
    in PySide6); panel.py also calls no property setters (PySide6 hides them with true_property)."""
    assert _pythonqt_violations(PANEL_FILE, forbid_setters=True) == []
    assert _pythonqt_violations(MODULE_FILE, forbid_setters=False) == []


def test_logic_test_double_and_logic_accept_what_the_controller_passes():
    """The controller's calls, by method: (positional arguments, keywords). Checked on the test double always, and
    on the real Logic's source when FMSegSlicerLib/logic.py exists."""
    uses = {"submit": (1, []), "connect": (0, ["url", "token", "device"]), "models": (0, []),
            "download_model": (1, ["progress"]),
            "prompt": (3, ["include_points", "exclude_points", "rois", "model", "use_adapter", "include_curves",
                           "exclude_curves"]),
            "undo": (1, []),
            "run_incontext": (3, ["support_size", "ensemble", "uncertainty", "model", "progress", "cancel",
                                  "candidates"]),
            "import_weights": (2, ["replace"]),
            "adapt": (1, ["mode", "method", "rank", "steps", "progress", "cancel"]),
            "save_adapter": (1, ["overwrite"]), "load_adapter": (1, []),
            "segment_with_adapter": (2, ["progress", "cancel"]),
            "run_task": (2, ["uncertainty", "progress", "cancel"]),
            "save_task": (2, ["model", "overwrite", "progress", "cancel"]), "load_task": (1, []),
            "clear_task": (0, [])}
    for name, (positional, keywords) in uses.items():
        parameters = list(inspect.signature(getattr(LogicTestDouble, name)).parameters)[1:]
        assert len(parameters) >= positional and set(keywords) <= set(parameters), name
    if not LOGIC_FILE.exists():
        pytest.skip("FMSegSlicerLib/logic.py is not written yet")
    tree = ast.parse(LOGIC_FILE.read_text())
    logic = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "FMSegLogic"]
    assert logic, "FMSegLogic not found in logic.py"
    methods = {f.name: f for f in logic[0].body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}
    for name in LogicTestDouble.ASYNC:  # the *_async variants take the blocking method's arguments
        variant = methods.get(f"{name}_async")
        if variant is not None:
            assert variant.args.vararg is not None and variant.args.kwarg is not None, name
    for name, (positional, keywords) in uses.items():
        assert name in methods, f"FMSegLogic.{name} is missing"
        arguments = methods[name].args
        names = [a.arg for a in arguments.posonlyargs + arguments.args][1:]
        accepted = set(names) | {a.arg for a in arguments.kwonlyargs}
        assert arguments.vararg is not None or len(names) >= positional, name
        assert arguments.kwarg is not None or set(keywords) <= accepted, (name, set(keywords) - accepted)


# --------------------------------------------------------------------------------------------------------------------
# PanelController under PySide6 with true_property


def test_true_property_is_on_for_panel_py_only(panel, ui, make_controller):
    assert qt_standins.features(PANEL_MODULE) == ["true_property"]
    assert qt_standins.features(__name__) == []
    # The hazard true_property removes: without it an assignment is a silent Python attribute.
    button = QtWidgets.QPushButton()
    button.enabled = False
    assert button.isEnabled()
    # panel.py's assignments reach Qt: the .ui leaves "Remove" enabled, the controller disables it (empty list).
    assert ui.removeSupportButton.isEnabled()
    make_controller(LogicTestDouble())
    assert not ui.removeSupportButton.isEnabled()
    assert "enabled" not in vars(ui.removeSupportButton)  # no stray Python attribute


def test_segment_button_needs_a_volume_and_a_segmentation(ui, mrml, make_controller):
    make_controller(LogicTestDouble())
    assert not ui.segmentButton.isEnabled()
    volume = mrml.volume("CT")
    ui.inputVolumeSelector.setCurrentNode(volume)
    assert not ui.segmentButton.isEnabled()
    ui.segmentationSelector.setCurrentNode(mrml.segmentation("Labels"))
    assert ui.segmentButton.isEnabled() and ui.undoButton.isEnabled()
    ui.inputVolumeSelector.setCurrentNode(None)
    assert not ui.segmentButton.isEnabled()
    # The stand-in selector refuses a node outside its nodeTypes, as the real one lists only those.
    ui.inputVolumeSelector.setCurrentNode(mrml.segmentation("not a volume"))
    assert ui.inputVolumeSelector.currentNode() is None and not ui.segmentButton.isEnabled()


@pytest.mark.parametrize("async_variants", [False, True], ids=["submit", "async-variants"])
def test_segment_runs_off_the_gui_thread_and_reports(panel, ui, mrml, make_controller, async_variants):
    release, threads = threading.Event(), []

    def prompt(**arguments):
        threads.append(threading.current_thread())
        assert release.wait(5)
        return "liver_id"

    roi = mrml.roi("FMSeg box")
    hooks = recording_hooks(panel, rois=[roi])
    logic = LogicTestDouble(async_variants, prompt=prompt)
    make_controller(logic, hooks)
    volume, segmentation = select_inputs(ui, mrml)
    include, exclude = mrml.points("FMSeg include"), mrml.points("FMSeg exclude")
    ui.includePointsPlaceWidget.setCurrentNode(include)
    ui.excludePointsPlaceWidget.setCurrentNode(exclude)
    ui.segmentNameEdit.setText("liver")
    ui.serverUrlEdit.setText("http://gpu-box:8765")
    ui.serverTokenEdit.setText("s3cret")
    ui.deviceSelector.setCurrentText("cuda")

    ui.segmentButton.click()
    assert not ui.segmentButton.isEnabled() and not ui.connectButton.isEnabled()
    wait_until(lambda: logic.called("prompt"), what="the prompt call")
    assert threads and threads[0] is not threading.main_thread()  # the job runs off the GUI thread
    assert ui.statusLabel.text() == "Segment\u2026"  # connected first, then started the prompt
    assert not ui.segmentButton.isEnabled()
    release.set()
    wait_until(lambda: ui.segmentButton.isEnabled(), what="the end of the job")

    assert logic.called("connect") == [{"url": "http://gpu-box:8765", "token": "s3cret", "device": "cuda"}]
    (arguments,) = logic.called("prompt")
    assert arguments["volume_node"] is volume and arguments["segmentation_node"] is segmentation
    assert arguments["segment_name"] == "liver" and arguments["model"] == "litemedsam"
    assert arguments["include_points"] is include and arguments["exclude_points"] is exclude
    assert arguments["rois"] == [roi] and arguments["use_adapter"] is False
    main = threading.main_thread()
    assert all(thread is not main for name, _a, thread in logic.calls if name in ("connect", "prompt"))
    if async_variants:  # the Logic's Pending: prepared and applied on the GUI thread
        assert [thread for name, _a, thread in logic.calls if name == "prompt_async"] == [main]
        assert logic.applied == [("prompt", main)]
    assert ui.statusLabel.text().startswith("Segmented 'liver' in ")
    assert hooks.results == [("prompt", "liver_id")]
    assert ui.connectButton.isEnabled()
    # Connected now: the next run does not connect again; changing the worker URL does.
    ui.segmentButton.click()
    wait_until(lambda: len(logic.called("prompt")) == 2 and ui.segmentButton.isEnabled(), what="second run")
    assert len(logic.called("connect")) == 1
    ui.serverUrlEdit.setText("")
    assert "connects again" in ui.statusLabel.text()
    ui.segmentButton.click()
    wait_until(lambda: len(logic.called("prompt")) == 3 and ui.segmentButton.isEnabled(), what="third run")
    assert logic.called("connect")[-1]["url"] == ""


@pytest.mark.parametrize("async_variants", [False, True], ids=["submit", "async-variants"])
def test_adaptation_shows_progress_locks_buttons_and_then_reverts(panel, ui, mrml, make_controller, async_variants):
    gate, reported = threading.Event(), threading.Event()

    def adapt(cases, mode, method, rank, steps, progress, cancel):
        # the Logic reports a Progress: count, loss, the phase, the time left are all shown.
        # steps 0 (the panel's default) leaves the count to the worker, which reports the method's (here 150)
        total = steps or 150
        progress(Progress(30, total, "training (lora)", loss=0.5, elapsed=12.0, remaining=48.0))
        reported.set()
        assert gate.wait(5)
        progress(Progress(total, total, "training (lora)", loss=0.125, elapsed=60.0, remaining=0.0))
        return {"structures": ["liver", "spleen"], "validation_dice": 0.87, "method": method}

    logic = LogicTestDouble(async_variants, adapt=adapt)
    controller = make_controller(logic, recording_hooks(panel))
    select_inputs(ui, mrml)
    assert not ui.adaptButton.isEnabled()
    case_volume, case_segmentation = mrml.volume("case 1"), mrml.segmentation("case 1 labels", ["liver", "spleen"])
    ui.caseVolumeSelector.setCurrentNode(case_volume)
    ui.caseSegmentationSelector.setCurrentNode(case_segmentation)
    ui.addCaseButton.click()
    assert table_rows(ui.caseTable) == [("case 1", "case 1 labels", "liver, spleen")]
    ui.methodSelector.setCurrentText("lora")
    ui.rankSpinBox.setValue(6)
    assert ui.adaptButton.isEnabled() and not ui.cancelButton.isEnabled()

    ui.adaptButton.click()  # connects first
    wait_until(lambda: controller.isRunning("adapter"), what="the adaptation to start")
    assert ui.cancelButton.isEnabled() and not ui.adaptButton.isEnabled()
    assert not ui.segmentWithAdapterButton.isEnabled() and not ui.loadAdapterButton.isEnabled()
    wait_until(lambda: reported.is_set() and ui.adaptProgressBar.value() == 20, what="20 % progress")
    assert ui.statusLabel.text() == "Adaptation: step 30/150, loss 0.5000: training (lora), 48 s left"
    assert ui.cancelButton.isEnabled() and not ui.adaptButton.isEnabled()
    assert controller.timer.isActive()

    gate.set()
    wait_until(lambda: ui.adaptButton.isEnabled(), what="the end of the adaptation")
    assert ui.adaptProgressBar.value() == 100
    assert not ui.cancelButton.isEnabled() and not controller.timer.isActive()
    assert "liver, spleen" in ui.adapterLabel.text() and "0.870" in ui.adapterLabel.text()
    assert ui.saveAdapterButton.isEnabled() and ui.segmentWithAdapterButton.isEnabled()
    assert ui.promptAdapterCheckBox.isEnabled()
    assert "\n" not in ui.statusLabel.text() and ui.statusLabel.text().startswith("Adaptation finished")
    (arguments,) = logic.called("adapt")
    assert arguments["cases"] == [(case_volume, case_segmentation, ["liver", "spleen"])]
    assert (arguments["mode"], arguments["method"], arguments["rank"], arguments["steps"]) == ("auto", "lora", 6, 0)


@pytest.mark.parametrize("async_variants", [False, True], ids=["submit", "async-variants"])
def test_cancel_stops_the_adaptation(panel, ui, mrml, make_controller, async_variants):
    cancelled = logic_module().Cancelled if async_variants else Cancelled

    def adapt(cases, mode, method, rank, steps, progress, cancel):
        step = 0
        while not cancel():
            step += 1
            progress(Progress(step, steps or 150, "training (lora)"))
            time.sleep(0.005)
        raise cancelled("cancelled")

    logic = LogicTestDouble(async_variants, adapt=adapt)
    controller = make_controller(logic, recording_hooks(panel))
    controller.connection = {"version": "test"}  # connected already
    controller.cases = [(mrml.volume("case"), mrml.segmentation("case labels", ["liver"]))]
    controller.refreshTables()
    controller.updateButtons()
    ui.adaptButton.click()
    wait_until(lambda: ui.adaptProgressBar.value() > 0, what="some progress")
    assert ui.cancelButton.isEnabled()
    ui.cancelButton.click()
    assert not ui.cancelButton.isEnabled()  # one click is enough
    assert ui.statusLabel.text().startswith("Cancelling adaptation")
    wait_until(lambda: ui.adaptButton.isEnabled(), what="the cancelled job to end")
    assert ui.statusLabel.text() == "Adaptation cancelled."
    assert ui.adaptProgressBar.value() == 0 and controller.adapter is None
    assert not ui.saveAdapterButton.isEnabled()


@pytest.mark.parametrize("async_variants", [False, True], ids=["submit", "async-variants"])
def test_an_exception_in_a_job_is_one_line_in_the_status(panel, ui, mrml, make_controller, async_variants):
    def prompt(**arguments):
        raise ValueError("spacing mismatch\nvolume 1.0 mm, segmentation 2.0 mm\n(details)")

    hooks = recording_hooks(panel, rois=[mrml.roi("box")])
    make_controller(LogicTestDouble(async_variants, prompt=prompt), hooks)
    select_inputs(ui, mrml)
    ui.segmentButton.click()
    wait_until(lambda: "failed" in ui.statusLabel.text(), what="the failure")
    assert ui.statusLabel.text() == "Segment failed: ValueError: spacing mismatch"
    assert hooks.errors == [("FMSeg: Segment failed",
                             "ValueError: spacing mismatch\nvolume 1.0 mm, segmentation 2.0 mm\n(details)")]
    wait_until(lambda: ui.segmentButton.isEnabled(), what="the button back")


@pytest.mark.parametrize("agree", [True, False])
def test_missing_packages_are_installed_only_after_asking_then_it_connects(panel, ui, mrml, make_controller, agree):
    from FMSegSlicerLib.dependencies import DependencyReport

    logic_errors = logic_module()
    report = DependencyReport("python", missing=["monai>=1.3"], torch={"version": "2.13.0"})
    attempts, asked = [], []

    def connect(url, token, device):
        attempts.append(url)
        if len(attempts) == 1:
            raise logic_errors.MissingDependencies(report)
        return {"version": "1.0", "device": "cpu", "models": []}

    class AskingHooks(type(recording_hooks(panel))):
        def confirmInstall(self, text):
            asked.append(text)
            return agree

    logic = LogicTestDouble(connect=connect, prompt=lambda **a: "id", install_dependencies=lambda report: "ok")
    make_controller(logic, AskingHooks())
    select_inputs(ui, mrml)
    ui.segmentButton.click()
    if agree:
        wait_until(lambda: logic.called("prompt"), what="the install, the second connection and the prompt")
        assert logic.called("install_dependencies") == [{"report": report}] and len(attempts) == 2
    else:
        wait_until(lambda: "failed" in ui.statusLabel.text(), what="the refusal")
        assert logic.called("install_dependencies") == [] and logic.called("prompt") == []
        assert "monai>=1.3" in ui.statusLabel.text()
    assert len(asked) == 1 and "monai>=1.3" in asked[0]


def test_connection_failure_is_reported_and_retried(panel, ui, mrml, make_controller):
    attempts = []

    def connect(url, token, device):
        attempts.append(url)
        if len(attempts) == 1:
            raise ConnectionError("worker did not start: torch not found")
        return {"version": "1.0", "device": "cpu", "models": []}

    logic = LogicTestDouble(connect=connect, prompt=lambda **a: "id")
    controller = make_controller(logic, recording_hooks(panel))
    select_inputs(ui, mrml)
    ui.segmentButton.click()
    wait_until(lambda: "failed" in ui.statusLabel.text(), what="the failure")
    assert ui.statusLabel.text() == "Connecting to the worker failed: ConnectionError: worker did not start: torch not found"
    assert logic.called("prompt") == [] and not controller.jobs
    ui.segmentButton.click()
    wait_until(lambda: logic.called("prompt") and ui.segmentButton.isEnabled(), what="the retry")
    assert len(attempts) == 2


def test_tables_are_filled_from_node_pairs(panel, ui, mrml, make_controller):
    controller = make_controller(LogicTestDouble(), recording_hooks(panel))
    controller.fillTable(ui.supportTable, [("CT 1", "CT 1 labels", ["liver", "spleen"]), ("CT 2", "seg", [])])
    assert table_rows(ui.supportTable) == [("CT 1", "CT 1 labels", "liver, spleen"), ("CT 2", "seg", "")]

    assert not ui.addSupportButton.isEnabled() and not ui.removeSupportButton.isEnabled()
    pairs = [(mrml.volume("chest"), mrml.segmentation("lungs", ["right lung", "left lung"])),
             (mrml.volume("abdomen"), mrml.segmentation("organs", ["liver", "spleen", "left kidney"]))]
    for volume, segmentation in pairs:
        ui.supportVolumeSelector.setCurrentNode(volume)
        ui.supportSegmentationSelector.setCurrentNode(segmentation)
        assert ui.addSupportButton.isEnabled()
        ui.addSupportButton.click()
    assert table_rows(ui.supportTable) == [("chest", "lungs", "right lung, left lung"),
                                           ("abdomen", "organs", "liver, spleen, left kidney")]
    ui.addSupportButton.click()  # the same pair again
    assert ui.supportTable.rowCount() == 2 and "already" in ui.statusLabel.text()
    ui.supportSegmentationSelector.setCurrentNode(mrml.segmentation("empty"))
    ui.addSupportButton.click()
    assert ui.supportTable.rowCount() == 2 and "no segments" in ui.statusLabel.text()
    assert ui.removeSupportButton.isEnabled()

    ui.supportTable.setCurrentCell(0, 0)
    ui.removeSupportButton.click()
    assert table_rows(ui.supportTable) == [("abdomen", "organs", "liver, spleen, left kidney")]
    controller.forgetNode(pairs[1][1])  # the segmentation left the scene
    assert ui.supportTable.rowCount() == 0 and not ui.removeSupportButton.isEnabled()


def test_incontext_run_passes_the_support_set_and_can_be_cancelled(panel, ui, mrml, make_controller):
    started = threading.Event()

    def run_incontext(volume_node, segmentation_node, supports, support_size, ensemble, uncertainty, model,
                      progress, cancel):
        progress(Progress(1, 4, "liver", elapsed=2.0, remaining=6.0))
        started.set()
        while not cancel():
            time.sleep(0.005)
        raise Cancelled("cancelled")

    logic = LogicTestDouble(run_incontext=run_incontext)
    hooks = recording_hooks(panel)
    make_controller(logic, hooks)
    volume, segmentation = select_inputs(ui, mrml)
    assert not ui.runInContextButton.isEnabled()
    support = (mrml.volume("atlas"), mrml.segmentation("atlas labels", ["liver", "spleen"]))
    ui.supportVolumeSelector.setCurrentNode(support[0])
    ui.supportSegmentationSelector.setCurrentNode(support[1])
    ui.addSupportButton.click()
    ui.supportSizeSpinBox.setValue(12)
    ui.ensembleSpinBox.setValue(3)
    ui.uncertaintyCheckBox.setChecked(True)
    assert ui.runInContextButton.isEnabled()
    ui.runInContextButton.click()  # connects first
    wait_until(started.is_set, what="the run to start")
    wait_until(lambda: "1/4" in ui.statusLabel.text(), what="progress text")
    assert ui.statusLabel.text() == "In-context segmentation: 1/4: liver, 6 s left"
    assert ui.cancelButton.isEnabled() and not ui.runInContextButton.isEnabled()
    assert ui.adaptProgressBar.value() == 0  # in-context progress is text only
    ui.cancelButton.click()
    wait_until(lambda: ui.runInContextButton.isEnabled(), what="the end of the run")
    assert ui.statusLabel.text() == "In-context segmentation cancelled."
    (arguments,) = logic.called("run_incontext")
    assert arguments["volume_node"] is volume and arguments["segmentation_node"] is segmentation
    assert arguments["supports"] == [(support[0], support[1], ["liver", "spleen"])]
    assert (arguments["support_size"], arguments["ensemble"], arguments["uncertainty"], arguments["model"]) == \
        (12, 3, True, "universeg-fmseg")
    assert hooks.errors == []


def test_prompt_changes_queue_one_more_run_while_segmenting(panel, ui, mrml, make_controller):
    gates = [threading.Event(), threading.Event()]

    def prompt(**arguments):
        index = len(logic.called("prompt")) - 1
        assert gates[min(index, 1)].wait(5)
        return f"run{index}"

    logic = LogicTestDouble(prompt=prompt)
    controller = make_controller(logic, recording_hooks(panel))
    select_inputs(ui, mrml)
    controller.promptChanged()
    wait_until(lambda: len(logic.called("prompt")) == 1, what="first run")
    controller.promptChanged()  # two more prompt changes during the run: one more run afterwards
    controller.promptChanged()
    assert controller.promptPending
    gates[0].set()
    wait_until(lambda: len(logic.called("prompt")) == 2, what="the queued run")
    gates[1].set()
    wait_until(lambda: not controller.jobs, what="idle")
    assert len(logic.called("prompt")) == 2 and not controller.promptPending
    ui.autoUpdateCheckBox.setChecked(False)
    controller.promptChanged()
    QtWidgets.QApplication.processEvents()
    assert not controller.jobs and len(logic.called("prompt")) == 2


def test_connect_fills_the_models_and_download_shows_progress(panel, ui, mrml, make_controller):
    models = [{"id": "litemedsam", "kind": "promptable", "available": True},
              {"id": "sam-med3d", "kind": "promptable", "available": False},
              {"id": "universeg-fmseg", "kind": "incontext", "available": True},
              {"id": "suprem-swinunetr", "kind": "weights only", "available": True}]
    gate = threading.Event()

    def download_model(model_id, progress):
        progress(Progress(3_000_000, 12_000_000, "downloading sam-med3d", elapsed=40.0, remaining=120.0))
        assert gate.wait(5)
        progress(Progress(12_000_000, 12_000_000, "downloading sam-med3d", elapsed=160.0, remaining=0.0))

    logic = LogicTestDouble(connect=lambda **a: {"version": "0.1.0", "device": "cuda", "models": models},
                            download_model=download_model)
    make_controller(logic, recording_hooks(panel))
    ui.connectButton.click()
    wait_until(lambda: ui.statusLabel.text().startswith("Connected"), what="connection")
    assert ui.statusLabel.text() == "Connected to local worker (version 0.1.0, device cuda); 3 of 4 models downloaded."
    assert combo_items(ui.promptModelSelector) == ["litemedsam", "sam-med3d"]
    assert combo_items(ui.incontextModelSelector) == ["universeg-fmseg"]
    assert ui.promptModelSelector.currentText() == "litemedsam"

    ui.downloadModelButton.click()
    assert "already downloaded" in ui.statusLabel.text() and logic.called("download_model") == []
    ui.promptModelSelector.setCurrentText("sam-med3d")
    ui.downloadModelButton.click()
    assert not ui.downloadModelButton.isEnabled()
    wait_until(lambda: ui.downloadProgressBar.value() == 25, what="25 %")
    assert ui.statusLabel.text() == "Download: sam-med3d 25 %, 2 min left"
    gate.set()
    wait_until(lambda: ui.downloadModelButton.isEnabled(), what="download end")
    assert ui.downloadProgressBar.value() == 100 and ui.statusLabel.text().startswith("Downloaded sam-med3d")
    assert [a["model_id"] for a in logic.called("download_model")] == ["sam-med3d"]
    assert len(logic.called("connect")) == 1  # connected by the button, not again by the download


def test_undo_runs_on_the_gui_thread_and_reports(panel, ui, mrml, make_controller):
    answers = iter([True, False])
    logic = LogicTestDouble(undo=lambda segmentation_node: next(answers))
    make_controller(logic, recording_hooks(panel))
    _volume, segmentation = select_inputs(ui, mrml)
    ui.undoButton.click()
    assert ui.statusLabel.text().startswith("Undone")
    ui.undoButton.click()
    assert ui.statusLabel.text() == "Nothing to undo."
    assert [thread for name, _a, thread in logic.calls if name == "undo"] == [threading.main_thread()] * 2
    assert logic.called("undo")[0]["segmentation_node"] is segmentation


def test_box_and_roi_buttons_exclude_each_other_and_place_mode(panel, ui, make_controller):
    hooks = recording_hooks(panel)
    controller = make_controller(LogicTestDouble(), hooks)
    controller.placeInclude()
    assert ui.includePointsPlaceWidget.placeModeEnabled and not ui.excludePointsPlaceWidget.placeModeEnabled
    controller.toggleBox()
    assert ui.boxButton.isChecked() and not ui.includePointsPlaceWidget.placeModeEnabled
    controller.toggleRoi()
    assert ui.roiButton.isChecked() and not ui.boxButton.isChecked()
    assert hooks.placing == [("box", True), ("box", False), ("roi", True)]
    controller.placingFinished()  # the views left place mode: buttons follow, the hooks are not asked again
    assert not ui.roiButton.isChecked() and hooks.placing[-1] == ("roi", True)
    controller.placeExclude()
    assert ui.excludePointsPlaceWidget.placeModeEnabled and not ui.includePointsPlaceWidget.placeModeEnabled
    ui.clearPromptsButton.click()
    assert hooks.cleared == 1 and ui.statusLabel.text() == "Prompts cleared."


def module_shortcuts() -> dict[str, str]:
    """FMSegSlicer.py's SHORTCUTS (key -> PanelController method), read with ast (the module imports Slicer)."""
    for node in ast.parse(MODULE_FILE.read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "SHORTCUTS":
            return dict(ast.literal_eval(node.value))
    raise AssertionError("SHORTCUTS not found in FMSegSlicer.py")


#: Keys Slicer's slice views handle themselves (vtkMRMLSliceIntersectionWidget): a shortcut on them would clash.
SLICE_VIEW_KEYS = {"b", "f", "r", "v", "g", "t", "V", "[", "]", "{", "}", "Left", "Right", "Up", "Down"}


def test_curve_tools_have_shortcuts_that_name_panel_actions_and_leave_slicer_keys(panel, ui):
    shortcuts = module_shortcuts()
    expected = {"s": "toggleScribble", "Shift+S": "toggleExcludeScribble", "l": "toggleLasso",
                "Shift+L": "toggleExcludeLasso"}
    assert {key: shortcuts.get(key) for key in expected} == expected
    assert not set(shortcuts) & SLICE_VIEW_KEYS
    for action in shortcuts.values():
        assert callable(getattr(panel.PanelController, action, None)), action
    for kind, name in panel.PLACING_BUTTONS.items():  # every tool has its button in the .ui
        assert getattr(ui, name).isCheckable(), kind


def test_one_placing_tool_at_a_time_scribbles_and_lassos_included(panel, ui, make_controller):
    hooks = recording_hooks(panel)
    controller = make_controller(LogicTestDouble(), hooks)
    controller.placeInclude()
    controller.toggleScribble()
    assert ui.scribbleButton.isChecked() and not ui.includePointsPlaceWidget.placeModeEnabled
    controller.toggleExcludeLasso()
    assert ui.excludeLassoButton.isChecked() and not ui.scribbleButton.isChecked()
    controller.toggleBox()
    assert ui.boxButton.isChecked() and not ui.excludeLassoButton.isChecked()
    controller.toggleExcludeScribble()
    controller.toggleLasso()
    assert hooks.placing == [("scribble", True), ("scribble", False), ("exclude-lasso", True),
                             ("exclude-lasso", False), ("box", True), ("box", False), ("exclude-scribble", True),
                             ("exclude-scribble", False), ("lasso", True)]
    controller.placingFinished()  # the user ended the lasso in the view: the button follows, no new request
    checked = [name for name in panel.PLACING_BUTTONS.values() if getattr(ui, name).isChecked()]
    assert checked == [] and hooks.placing[-1] == ("lasso", True)
    controller.toggleLasso()
    controller.toggleLasso()  # pressing the key again stops placing
    assert hooks.placing[-2:] == [("lasso", True), ("lasso", False)] and not ui.lassoButton.isChecked()


def test_a_failure_to_start_placing_a_curve_is_reported(panel, ui, make_controller):
    class Failing(panel.PanelHooks):
        def __init__(self):
            self.errors = []

        def setPlacing(self, kind, enabled):
            raise RuntimeError("no slice view")

        def showError(self, title, text):
            self.errors.append((title, text))

    hooks = Failing()
    make_controller(LogicTestDouble(), hooks)
    ui.excludeScribbleButton.click()
    assert hooks.errors == [("FMSeg: Placing an exclude scribble failed", "RuntimeError: no slice view")]
    assert "no slice view" in ui.statusLabel.text()


def test_segment_sends_the_scribbles_and_lassos_with_the_other_prompts(panel, ui, mrml, make_controller):
    include = [mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsCurveNode", "scribble"),
               mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsClosedCurveNode", "lasso")]
    exclude = [mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsCurveNode", "no")]
    logic = LogicTestDouble(prompt=lambda **arguments: "segment-id")
    hooks = recording_hooks(panel, curves=(include, exclude))
    make_controller(logic, hooks)
    select_inputs(ui, mrml)
    ui.segmentButton.click()
    wait_until(lambda: hooks.results, what="the result")
    (arguments,) = logic.called("prompt")
    assert arguments["include_curves"] == include and arguments["exclude_curves"] == exclude


def test_adapter_files_and_segmentation_with_the_adapter(panel, ui, mrml, make_controller, tmp_path):
    path = str(tmp_path / "liver.fmseg")

    class Hooks(type(recording_hooks(panel))):
        def chooseAdapterPath(self, save):
            return path

    hooks = Hooks()
    logic = LogicTestDouble(load_adapter=lambda path: {"structures": [{"name": "liver"}], "validation_dice": {"liver": 0.9}},
                            save_adapter=lambda path, overwrite: None,
                            segment_with_adapter=lambda volume_node, segmentation_node, progress, cancel: ["liver_id"])
    make_controller(logic, hooks)
    select_inputs(ui, mrml)
    assert not ui.saveAdapterButton.isEnabled() and not ui.segmentWithAdapterButton.isEnabled()
    ui.loadAdapterButton.click()
    wait_until(lambda: ui.saveAdapterButton.isEnabled(), what="the adapter")
    assert ui.adapterLabel.text() == f"Adapter: liver; validation Dice liver 0.900; from {path}"
    assert ui.segmentWithAdapterButton.isEnabled()
    ui.segmentWithAdapterButton.click()
    wait_until(lambda: hooks.results, what="the adapter result")
    assert hooks.results == [("adapter-segment", ["liver_id"])]
    assert ui.statusLabel.text().startswith("Adapter segmented 1 structure in")
    ui.saveAdapterButton.click()
    wait_until(lambda: ui.statusLabel.text() == f"Adapter saved to {path}.", what="saved")
    assert logic.called("save_adapter") == [{"path": path, "overwrite": True}]  # the save dialog asked
    # Prompts use the adapter only when asked.
    logic.functions["prompt"] = lambda **a: "id"
    ui.promptAdapterCheckBox.setChecked(True)
    ui.segmentButton.click()
    wait_until(lambda: logic.called("prompt") and ui.segmentButton.isEnabled(), what="prompt")
    assert logic.called("prompt")[0]["use_adapter"] is True


def test_adapter_mode_decides_between_prompting_and_automatic_segmentation(panel, ui, mrml, make_controller):
    controller = make_controller(LogicTestDouble(), recording_hooks(panel))
    select_inputs(ui, mrml)
    controller._setAdapter({"structures": ["liver"], "mode": "prompt"})
    assert ui.promptAdapterCheckBox.isEnabled() and not ui.segmentWithAdapterButton.isEnabled()
    assert "prompt mode" in ui.adapterLabel.text()
    controller._setAdapter({"structures": ["liver"], "mode": "auto"})
    assert not ui.promptAdapterCheckBox.isEnabled() and ui.segmentWithAdapterButton.isEnabled()


TASK_MODELS = [{"id": "universeg-fmseg", "kind": "incontext", "dims": 2, "available": True},
               {"id": "iris-fmseg", "kind": "incontext", "dims": 3, "available": True}]
TASK_INFO = {"task": "t1", "model": "iris-fmseg", "references": 1,
             "classes": [{"value": 1, "name": "liver", "color": [0.8, 0.4, 0.3]},
                         {"value": 2, "name": "spleen", "color": [0.6, 0.2, 0.8]}]}


def task_hooks(panel, path):
    class Hooks(type(recording_hooks(panel))):
        def __init__(self):
            super().__init__()
            self.asked = []

        def chooseTaskPath(self, save):
            self.asked.append(save)
            return path

    return Hooks()


@pytest.mark.parametrize("async_variants", [False, True], ids=["submit", "async-variants"])
def test_task_buttons_save_load_run_with_the_task_and_clear(panel, ui, mrml, make_controller, tmp_path,
                                                            async_variants):
    path = str(tmp_path / "upper.fmseg-task")
    gate = threading.Event()

    def save_task(supports, path, model, overwrite, progress, cancel):
        progress(Progress(1, 2, "encoding 2 classes from 1 reference"))
        assert gate.wait(5)
        return dict(TASK_INFO, path=path)

    logic = LogicTestDouble(async_variants,
                            connect=lambda **a: {"version": "t", "device": "cpu", "models": TASK_MODELS},
                            save_task=save_task, load_task=lambda path: dict(TASK_INFO),
                            run_task=lambda **a: {"segments": ["liver_id", "spleen_id"], "uncertainty_node": None},
                            clear_task=lambda: None)
    hooks = task_hooks(panel, path)
    controller = make_controller(logic, hooks)
    volume, segmentation = select_inputs(ui, mrml)
    # nothing to build from, no task: only loading is possible
    assert ui.loadTaskButton.isEnabled()
    assert not ui.saveTaskButton.isEnabled() and not ui.clearTaskButton.isEnabled()
    assert not ui.runInContextButton.isEnabled()
    assert ui.taskLabel.text() == "No task loaded: in-context runs use the support set."
    support = (mrml.volume("atlas"), mrml.segmentation("atlas labels", ["liver", "spleen"]))
    ui.supportVolumeSelector.setCurrentNode(support[0])
    ui.supportSegmentationSelector.setCurrentNode(support[1])
    ui.addSupportButton.click()
    assert not ui.saveTaskButton.isEnabled()  # the model's dimensions are not known before connecting
    controller.saveTask()
    assert "not a 3-D in-context model" in ui.statusLabel.text() and hooks.asked == []
    ui.connectButton.click()
    wait_until(lambda: ui.statusLabel.text().startswith("Connected"), what="connection")
    assert combo_items(ui.incontextModelSelector) == ["universeg-fmseg", "iris-fmseg"]
    assert not ui.saveTaskButton.isEnabled()  # a 2-D model makes no task
    ui.incontextModelSelector.setCurrentText("iris-fmseg")
    assert ui.saveTaskButton.isEnabled()

    ui.saveTaskButton.click()
    wait_until(lambda: "encoding" in ui.statusLabel.text(), what="the task job's progress")
    assert ui.statusLabel.text() == "Saving the task: 1/2: encoding 2 classes from 1 reference"
    assert not ui.saveTaskButton.isEnabled() and not ui.loadTaskButton.isEnabled()
    assert not ui.runInContextButton.isEnabled() and ui.cancelButton.isEnabled()
    gate.set()
    wait_until(lambda: ui.saveTaskButton.isEnabled(), what="the end of the task job")
    assert ui.statusLabel.text().startswith(f"Task saved to {path} in ")
    assert "liver, spleen (iris-fmseg, 1 reference)" in ui.statusLabel.text()
    (arguments,) = logic.called("save_task")
    assert arguments["supports"] == [(support[0], support[1], ["liver", "spleen"])]
    assert (arguments["path"], arguments["model"], arguments["overwrite"]) == (path, "iris-fmseg", True)
    assert controller.task is None  # saving does not load it

    ui.loadTaskButton.click()
    wait_until(lambda: ui.clearTaskButton.isEnabled(), what="the task to load")
    assert hooks.asked == [True, False] and logic.called("load_task") == [{"path": path}]
    assert ui.taskLabel.text() == f"Task: liver, spleen (iris-fmseg, 1 reference) from {path}"
    assert ui.runInContextButton.text() == "Segment with task"
    ui.supportTable.setCurrentCell(0, 0)
    ui.removeSupportButton.click()  # the task needs no support set
    assert ui.runInContextButton.isEnabled() and not ui.saveTaskButton.isEnabled()
    ui.uncertaintyCheckBox.setChecked(True)
    ui.runInContextButton.click()
    wait_until(lambda: hooks.results, what="the task's result")
    assert hooks.results == [("incontext", {"segments": ["liver_id", "spleen_id"], "uncertainty_node": None})]
    assert ui.statusLabel.text().startswith("In-context: 2 segments in ")
    (arguments,) = logic.called("run_task")
    assert arguments["volume_node"] is volume and arguments["segmentation_node"] is segmentation
    assert arguments["uncertainty"] is True and logic.called("run_incontext") == []
    if async_variants:
        assert [name for name, _thread in logic.applied] == ["save_task", "run_task"]

    ui.clearTaskButton.click()
    assert logic.called("clear_task") == [{}] and controller.task is None
    assert ui.taskLabel.text() == "No task loaded: in-context runs use the support set."
    assert ui.runInContextButton.text() == "Segment from support set"
    assert not ui.runInContextButton.isEnabled() and not ui.clearTaskButton.isEnabled()  # no support left
    assert hooks.errors == []


def test_a_task_that_cannot_load_is_reported_and_the_support_set_stays_in_use(panel, ui, mrml, make_controller,
                                                                               tmp_path):
    def load_task(path):
        raise ValueError("worker: task: not an FMSeg task file (create one with fmseg task create)")

    hooks = task_hooks(panel, str(tmp_path / "notes.fmseg-task"))
    logic = LogicTestDouble(load_task=load_task)
    controller = make_controller(logic, hooks)
    select_inputs(ui, mrml)
    ui.loadTaskButton.click()
    wait_until(lambda: "failed" in ui.statusLabel.text(), what="the refusal")
    assert ui.statusLabel.text() == ("Loading the task failed: ValueError: worker: task: not an FMSeg task file "
                                     "(create one with fmseg task create)")
    assert controller.task is None and not ui.clearTaskButton.isEnabled() and ui.loadTaskButton.isEnabled()
    assert len(hooks.errors) == 1
    controller.hooks = task_hooks(panel, "")  # the user cancels the dialog: nothing runs
    assert controller.loadTask() is None and len(logic.called("load_task")) == 1


# --------------------------------------------------------------------------------------------------------------------
# The panel driving the real Logic and a real local worker


def test_the_panel_segments_through_the_real_logic_and_worker_and_undo_restores(panel, ui, mrml, make_controller):
    """Stand-in UI, real everything else: the controller, FMSegLogic, a worker process, slicer-core MRML."""
    import slicer.util
    from FMSegSlicerLib.scene_geometry import to_vtk_matrix as vtk_matrix
    from slicer_scene import roi_on_grid
    from worker_fixtures import ct_case

    logic_errors = logic_module()
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    image, labels, names = ct_case()
    matrix = np.eye(4)
    matrix[:3, :3] = lps_to_ras @ np.asarray(image.direction) @ np.diag(image.spacing)
    matrix[:3, 3] = lps_to_ras @ np.asarray(image.origin)
    ijk_to_ras = vtk_matrix(matrix)
    volume = slicer.util.addVolumeFromArray(np.ascontiguousarray(image.array), ijk_to_ras, "CT real")
    segmentation = mrml.segmentation("Result")
    kidney = labels == names["kidney_left"]
    k, j, i = np.nonzero(kidney)
    middle = int(np.median(k))
    lo, hi = np.array([i.min() - 2, j.min() - 2, middle - 1]), np.array([i.max() + 2, j.max() + 2, middle + 1])
    roi = roi_on_grid(volume, lo, hi, "FMSeg ROI")

    real = logic_errors.FMSegLogic(mrml.scene, device="cpu")
    real.executor = real._executor  # the fixture's clean-up shuts this down
    hooks = recording_hooks(panel, rois=[roi])
    make_controller(real, hooks)
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.segmentationSelector.setCurrentNode(segmentation)
    ui.segmentNameEdit.setText("kidney_left")
    ui.deviceSelector.setCurrentText("cpu")
    try:
        ui.segmentButton.click()
        wait_until(lambda: hooks.results or "failed" in ui.statusLabel.text(), timeout=300, what="the segment")
        assert hooks.results and hooks.results[0][0] == "prompt", ui.statusLabel.text()
        segment_id = segmentation.GetSegmentation().GetSegmentIdBySegmentName("kidney_left")
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume).astype(bool)
        truth = kidney[middle - 1: middle + 2]
        got = mask[middle - 1: middle + 2]
        assert 2 * (got & truth).sum() / (got.sum() + truth.sum()) > 0.8
        assert not mask[: middle - 1].any() and not mask[middle + 2:].any()  # the ROI's 3 slices only
        ui.undoButton.click()
        wait_until(lambda: segmentation.GetSegmentation().GetNumberOfSegments() == 0, timeout=30, what="undo")
    finally:
        real.shutdown()


def test_the_panel_saves_loads_and_applies_a_task_through_the_real_logic_and_worker(panel, ui, mrml, make_controller,
                                                                                    tmp_path, monkeypatch):
    """Stand-in UI, real everything else (FMSegLogic, a worker serving on 127.0.0.1 in this process, slicer-core
    MRML): "Save task…" writes a task file FMSegCore reads; "Load task…" then "Segment with task" writes the task's
    segments, voxel for voxel what the task gives in-process."""
    import slicer.util
    import torch
    from FMSegSlicerLib.scene_geometry import to_vtk_matrix, volume_meta
    from worker_fixtures import CT_CASE, TOKEN, running_worker

    from FMSegCore.engines.incontext.task_file import load_task
    from FMSegCore.engines.incontext.volume3d import apply_task
    from FMSegCore.io.labelmap import read_labelmap
    from FMSegCore.io.volume import Volume, read_volume
    from FMSegCore.models.factory import load_model
    from FMSegCore.server.service import Service

    logic_module()
    monkeypatch.setattr("FMSegCore.server.service.tune_cpu_runtime", lambda threads=None: None)  # one core
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    image = read_volume(CT_CASE / "image.nii.gz")
    labels, segments = read_labelmap(CT_CASE / "label.nii.gz", reference=image)
    colors = {s.name: s.color for s in segments}
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])

    def add_crop(start, stop, name):
        box = tuple(slice(a, b) for a, b in zip(start, stop))
        matrix = np.eye(4)
        matrix[:3, :3] = lps_to_ras @ np.asarray(image.direction) @ np.diag(image.spacing)
        matrix[:3, 3] = lps_to_ras @ image.ijk_to_lps(np.array(start[::-1], dtype=float))[0]
        array = np.ascontiguousarray(image.array[box])
        return slicer.util.addVolumeFromArray(array, to_vtk_matrix(matrix), name), box

    reference, box = add_crop((72, 20, 8), (112, 90, 106), "reference")
    query, _ = add_crop((74, 28, 40), (112, 84, 100), "query")
    support = mrml.segmentation("reference labels")
    for value, name in ((5, "liver"), (1, "spleen")):
        segment_id = support.GetSegmentation().AddEmptySegment(name, name, colors[name])
        mask = (labels.array[box] == value).astype(np.uint8)
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, support, segment_id, reference)
    result = mrml.segmentation("task result")
    path = str(tmp_path / "upper abdomen.fmseg-task")

    with running_worker(service=Service("cpu")) as server:
        real = logic_module().FMSegLogic(mrml.scene, device="cpu")
        real.executor = real._executor  # the fixture's clean-up shuts this down
        hooks = task_hooks(panel, path)
        make_controller(real, hooks)
        try:
            ui.serverUrlEdit.setText(server.url)
            ui.serverTokenEdit.setText(TOKEN)
            ui.inputVolumeSelector.setCurrentNode(query)
            ui.segmentationSelector.setCurrentNode(result)
            ui.supportVolumeSelector.setCurrentNode(reference)
            ui.supportSegmentationSelector.setCurrentNode(support)
            ui.addSupportButton.click()
            ui.connectButton.click()
            wait_until(lambda: ui.statusLabel.text().startswith("Connected"), timeout=60, what="the connection")
            ui.incontextModelSelector.setCurrentText("iris-fmseg")
            assert ui.saveTaskButton.isEnabled()

            ui.saveTaskButton.click()
            wait_until(lambda: ui.statusLabel.text().startswith(("Task saved", "Saving the task failed")), timeout=120,
                       what="the task file")
            assert ui.statusLabel.text().startswith(f"Task saved to {path}"), ui.statusLabel.text()
            task, metadata = load_task(path, model="iris-fmseg")
            assert [(c.value, c.name) for c in metadata.classes] == [(1, "liver"), (2, "spleen")]
            assert [c.color for c in metadata.classes] == pytest.approx([colors["liver"], colors["spleen"]])
            assert metadata.references == 1 and task.shape[0] == 2

            ui.loadTaskButton.click()
            wait_until(lambda: ui.clearTaskButton.isEnabled() or "failed" in ui.statusLabel.text(), timeout=60,
                       what="the task to load")
            assert ui.taskLabel.text() == f"Task: liver, spleen (iris-fmseg, 1 reference) from {path}"
            ui.supportTable.setCurrentCell(0, 0)
            ui.removeSupportButton.click()  # the run uses the task, not the support set
            ui.runInContextButton.click()
            wait_until(lambda: hooks.results or "failed" in ui.statusLabel.text(), timeout=120, what="the result")
            assert hooks.results and hooks.results[0][0] == "incontext", ui.statusLabel.text()
        finally:
            real.shutdown()
            torch.set_num_threads(threads)

    segmentation = result.GetSegmentation()
    assert [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())] == \
        ["liver", "spleen"]
    meta = volume_meta(query)
    volume = Volume(slicer.util.arrayFromVolume(query).copy(), meta["spacing"], meta["origin"],
                    np.reshape(meta["direction"], (3, 3)))
    expected = apply_task(load_model("iris-fmseg", "cpu"), task, volume, metadata.classes).labels
    for value, name in ((1, "liver"), (2, "spleen")):
        segment_id = segmentation.GetSegmentIdBySegmentName(name)
        assert segmentation.GetSegment(segment_id).GetColor() == pytest.approx(colors[name], abs=1e-6)
        got = slicer.util.arrayFromSegmentBinaryLabelmap(result, segment_id, query).astype(bool)
        assert np.array_equal(got, expected == value), name


# --------------------------------------------------------------------------------------------------------------------
# Official models: weights imported by hand, and the candidates of stochastic in-context models


STOCHASTIC_MODELS = [{"id": "universeg-fmseg", "kind": "incontext", "dims": 2, "available": True},
                     {"id": "tyche", "kind": "incontext", "dims": 2, "stochastic": True, "available": True},
                     {"id": "iris-fmseg", "kind": "incontext", "dims": 3, "available": True}]


def test_candidates_are_offered_for_stochastic_models_only_within_the_options_range(panel, ui, mrml, make_controller,
                                                                                  tmp_path):
    from FMSegCore.options import InContext, bounds

    def run_incontext(**arguments):
        return {"segments": ["liver_id"], "uncertainty_node": None,
                "candidate_nodes": ["c"] * arguments.get("candidates", 0)}

    logic = LogicTestDouble(connect=lambda **a: {"version": "t", "device": "cpu", "models": STOCHASTIC_MODELS},
                            run_incontext=run_incontext, load_task=lambda path: dict(TASK_INFO))
    hooks = task_hooks(panel, str(tmp_path / "t.fmseg-task"))
    controller = make_controller(logic, hooks)
    spin = ui.candidatesSpinBox
    assert (spin.minimum(), spin.maximum(), spin.value()) == (*bounds(InContext, "candidates"), InContext.candidates)
    spin.setValue(10_000)
    assert spin.value() == bounds(InContext, "candidates")[1]  # the worker's limit, not the .ui's
    assert not spin.isEnabled()  # not connected: nothing says the model is stochastic
    select_inputs(ui, mrml)
    ui.supportVolumeSelector.setCurrentNode(mrml.volume("atlas"))
    ui.supportSegmentationSelector.setCurrentNode(mrml.segmentation("atlas labels", ["liver"]))
    ui.addSupportButton.click()
    ui.connectButton.click()
    wait_until(lambda: ui.statusLabel.text().startswith("Connected"), what="connection")
    assert ui.incontextModelSelector.currentText() == "universeg-fmseg" and not spin.isEnabled()
    ui.incontextModelSelector.setCurrentText("tyche")
    assert spin.isEnabled()
    spin.setValue(3)
    ui.runInContextButton.click()
    wait_until(lambda: len(hooks.results) == 1, what="the tyche run")
    assert logic.called("run_incontext")[0]["candidates"] == 3
    assert ui.statusLabel.text().endswith(" s, 3 candidate segmentations (hidden) added.")
    ui.incontextModelSelector.setCurrentText("universeg-fmseg")
    assert not spin.isEnabled() and spin.value() == 3
    ui.runInContextButton.click()
    wait_until(lambda: len(hooks.results) == 2, what="the universeg run")
    assert "candidates" not in logic.called("run_incontext")[1]  # the spin box's value is not sent
    ui.incontextModelSelector.setCurrentText("tyche")
    ui.loadTaskButton.click()
    wait_until(lambda: controller.task is not None, what="the task")
    assert not spin.isEnabled()  # a task draws no candidates
    assert hooks.errors == []


def weights_hooks(panel, paths, answers=()):
    """Hooks whose weights dialog returns ``paths[model]`` ("" when absent: cancelled) and whose confirmations
    answer ``answers`` in turn; what was asked is recorded."""

    class Hooks(type(recording_hooks(panel))):
        def __init__(self):
            super().__init__()
            self.asked, self.questions, self.answers = [], [], list(answers)

        def chooseWeightsPath(self, model):
            self.asked.append(model)
            return paths.get(model, "")

        def confirm(self, title, text):
            self.questions.append((title, text))
            return self.answers.pop(0)

    return Hooks()


def test_the_panel_imports_weights_through_the_real_logic_and_worker_then_draws_tyche_candidates(
        panel, ui, mrml, make_controller, tmp_path, monkeypatch):
    """Stand-in UI, real everything else (FMSegLogic, a worker serving on 127.0.0.1 in this process with a
    throw-away model cache, slicer-core MRML): a wrong file is the worker's one line in the status and leaves the
    cache as it was; the fixture's Tyche checkpoint is installed, the models are listed again, the candidates spin
    box opens, and a run with 2 candidates adds two segmentation nodes."""
    import slicer.util
    import torch
    from FMSegSlicerLib.scene_geometry import to_vtk_matrix
    from reference_fixtures import TYCHE_CENTRED, official_checkpoint
    from worker_fixtures import TOKEN, ct_case, running_worker

    from FMSegCore.server.service import Service

    logic_module()
    cache = tmp_path / "cache"
    monkeypatch.setenv("FMSEG_CACHE_DIR", str(cache))  # Tyche's weights cannot be fetched here
    monkeypatch.setattr("FMSegCore.server.service.tune_cpu_runtime", lambda threads=None: None)  # one core
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    good = tmp_path / "tyche_v1_model_weights_CVPR.pt"
    good.write_bytes(official_checkpoint("tyche", shifts=TYCHE_CENTRED))
    other_family = tmp_path / "universeg_v1.pt"
    other_family.write_bytes(official_checkpoint("universeg", wrapping=None))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:20_000])

    image, labels, names = ct_case()
    liver = np.flatnonzero((labels == names["liver"]).any(axis=(1, 2)))
    ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.diag([*image.spacing, 1.0])

    block = liver[len(liver) // 2 - 3: len(liver) // 2 + 3]  # a few slices, two of them labelled: the support
    volume = slicer.util.addVolumeFromArray(np.ascontiguousarray(image.array[block]), to_vtk_matrix(ijk_to_ras),
                                            "tyche CT")
    sparse = np.zeros((len(block),) + labels.shape[1:], dtype=np.uint8)
    sparse[[0, -1]] = labels[block[[0, -1]]] == names["liver"]
    support = mrml.segmentation("tyche sparse labels")
    segment_id = support.GetSegmentation().AddEmptySegment("liver", "liver", (0.8, 0.3, 0.2))
    slicer.util.updateSegmentBinaryLabelmapFromArray(sparse, support, segment_id, volume)
    result = mrml.segmentation("tyche result")

    def files():
        return sorted(str(path) for path in cache.rglob("*")) if cache.exists() else []

    with running_worker(service=Service("cpu")) as server:
        real = logic_module().FMSegLogic(mrml.scene, device="cpu")
        real.executor = real._executor  # the fixture's clean-up shuts this down
        paths = {"tyche": str(other_family)}
        hooks = weights_hooks(panel, paths, answers=[False, True])
        controller = make_controller(real, hooks)
        try:
            ui.serverUrlEdit.setText(server.url)
            ui.serverTokenEdit.setText(TOKEN)
            ui.importWeightsButton.click()  # connects first: which models have weights is the worker's to say
            wait_until(lambda: hooks.asked, timeout=60, what="the weights dialog")
            assert ui.incontextModelSelector.currentText() == "universeg-fmseg"
            # the default models have weights (they ship with FMSeg): each is offered, the user cancels both
            assert hooks.asked == ["litemedsam", "universeg-fmseg"] and not controller.jobs
            assert not ui.candidatesSpinBox.isEnabled()
            ui.incontextModelSelector.setCurrentText("tyche")
            assert ui.candidatesSpinBox.isEnabled()  # the worker's card: tyche is stochastic
            before = files()
            for wrong, problem in ((other_family, "not a Tyche checkpoint"), (truncated, "cannot read a Tyche")):
                paths["tyche"] = str(wrong)
                hooks.asked.clear()
                ui.importWeightsButton.click()
                wait_until(lambda: "failed" in ui.statusLabel.text(), timeout=60, what="the refusal")
                assert hooks.asked == ["tyche"]  # litemedsam has weights (bundled): tyche is the one without
                status = ui.statusLabel.text()
                assert status.startswith(f"Importing {wrong.name} as tyche's weights failed: WorkerError: worker: "
                                         "weights: the uploaded file: "), status
                assert problem in status  # the status is cut to its length; the dialog has the whole line
                title, text = hooks.errors[-1]
                assert title == f"FMSeg: Importing {wrong.name} as tyche's weights failed" and "\n" not in text
                assert text.startswith("WorkerError: worker: weights: the uploaded file: ") and problem in text
                assert text.endswith("(importing it as tyche)")
                assert files() == before and not controller.models["tyche"]["available"]
                ui.statusLabel.setText("")
            assert len(hooks.errors) == 2 and hooks.questions == []

            paths["tyche"] = str(good)
            ui.importWeightsButton.click()
            wait_until(lambda: ui.statusLabel.text().startswith(("Imported", "Importing")) and not controller.jobs,
                       timeout=60, what="the import")
            assert ui.statusLabel.text().startswith("Imported tyche's weights in "), ui.statusLabel.text()
            assert "no published sha256 to verify" in ui.statusLabel.text()
            installed = [path for path in cache.rglob("*.pt") if path.is_file()]
            assert [path.read_bytes() for path in installed] == [good.read_bytes()]
            assert controller.models["tyche"]["available"] and controller.models["tyche"]["stochastic"]
            assert ui.incontextModelSelector.currentText() == "tyche" and ui.candidatesSpinBox.isEnabled()

            hooks.asked.clear()
            paths["litemedsam"] = ""  # every selected model has weights: each is offered, the user skips the first
            ui.importWeightsButton.click()  # ... and declines replacing tyche's
            assert hooks.asked == ["litemedsam", "tyche"] and len(hooks.questions) == 1
            assert "tyche has weights already" in hooks.questions[0][1]
            assert ui.statusLabel.text() == "Import cancelled: tyche keeps its weights." and not controller.jobs
            ui.importWeightsButton.click()  # replaced after asking
            wait_until(lambda: ui.statusLabel.text().startswith("Imported") and not controller.jobs, timeout=60,
                       what="the replacement")
            assert len(hooks.questions) == 2

            ui.inputVolumeSelector.setCurrentNode(volume)
            ui.segmentationSelector.setCurrentNode(result)
            ui.supportVolumeSelector.setCurrentNode(volume)
            ui.supportSegmentationSelector.setCurrentNode(support)
            ui.addSupportButton.click()
            ui.supportSizeSpinBox.setValue(2)
            ui.candidatesSpinBox.setValue(2)
            ui.runInContextButton.click()
            wait_until(lambda: hooks.results or "failed" in ui.statusLabel.text(), timeout=120, what="the result")
            assert hooks.results and hooks.results[0][0] == "incontext", ui.statusLabel.text()
            assert "2 candidate segmentations (hidden) added" in ui.statusLabel.text()
        finally:
            real.shutdown()
            torch.set_num_threads(threads)

    nodes = hooks.results[0][1]["candidate_nodes"]
    assert [node.GetName() for node in nodes] == ["tyche result candidate 1", "tyche result candidate 2"]
    drawn = [slicer.util.arrayFromSegmentBinaryLabelmap(node, node.GetSegmentation().GetSegmentIdBySegmentName("liver"),
                                                        volume) for node in nodes]
    assert drawn[0].any() and (drawn[0] != drawn[1]).any()
