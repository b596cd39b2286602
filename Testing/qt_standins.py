"""Stand-ins for running the Slicer module panel under PySide6 (offscreen) in tests.

They do not replace a run inside Slicer: Slicer's panel runs under PythonQt with the real CTK and qMRML widgets.
This helper gives the tests three things:

- ``make_qt()``: a ``qt`` namespace over PySide6 (QtCore, QtGui and QtWidgets names in one module, like PythonQt's
  ``qt``), handed to ``PanelController`` as its ``qt`` argument;
- ``import_with_true_property(name)``: imports a module with PySide6's ``true_property`` feature switched on for
  that module only, so that ``widget.enabled = False`` or ``label.text = "..."`` reach Qt as they do under
  PythonQt (without the feature, PySide6 silently stores a plain Python attribute and the widget does not
  change). PySide6 selects features per module, by the ``__name__`` of the code that runs, from the table
  ``__feature__.pyside_feature_dict``; ``from __feature__ import true_property`` fills that table for the module
  that contains the line, and ``__feature__.set_selection(flags, module_name)`` (PySide6's own function, which
  its ``__feature__`` docstring describes as the alternative to the import) fills it for another module. So the
  module under test keeps its source unchanged (it must stay PythonQt code) and its code runs with
  ``true_property``, while the test modules keep plain PySide6 and read state back through Qt getters.
  Two facts seen with PySide6 6.12: code of a module with no entry, or the entry -1 ("ignored": modules whose
  source does not mention PySide6), runs with whatever selection was switched last, so a test module pins its
  own selection with ``set_features(__name__)``; and with ``true_property`` the setters of Qt properties are
  hidden (``setText``) or unusable (``setRowCount`` comes back unbound), so the code under test writes properties
  as attributes (``table.rowCount = 2``), which PythonQt accepts too;
- Python stand-ins for the Slicer custom widgets named in ``.ui`` files, registered with ``QUiLoader`` so the
  real ``.ui`` file loads (``load_ui``). They mirror the real classes' names, Qt properties, signals and slots as
  far as the panel uses them, not their behaviour (no node lists, no place mode in views).

Qt facts that shape them: a ``.ui`` connection such as ``mrmlSceneChanged(vtkMRMLScene*)`` ->
``setMRMLScene(vtkMRMLScene*)`` is made by Qt from the signature strings, so the stand-ins declare exactly those
signatures (Qt then checks the names in the ``.ui``; ``load_ui`` collects its warnings). A signal with the type
``vtkMRMLScene*`` cannot be emitted from PySide6 (the type is unknown to Qt), so the stand-in ``qMRMLWidget``
stores the scene and does not propagate it: tests check the connections, not their effect.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
import types

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6 import QtCore, QtGui, QtWidgets  # noqa: E402
from PySide6.QtUiTools import QUiLoader  # noqa: E402

Signal, Slot, Property = QtCore.Signal, QtCore.Slot, QtCore.Property

#: The scene type as Slicer's .ui connections spell it.
SCENE = "vtkMRMLScene*"


def make_qt() -> types.ModuleType:
    """A module named ``qt`` holding the PySide6 QtCore, QtGui and QtWidgets names, as PythonQt's ``qt`` does."""
    qt = types.ModuleType("qt", "PySide6 stand-in for PythonQt's qt module (tests only)")
    for module in (QtCore, QtGui, QtWidgets):
        for name in dir(module):
            if not name.startswith("_"):
                setattr(qt, name, getattr(module, name))
    return qt


def application() -> QtWidgets.QApplication:
    """The QApplication (created offscreen if there is none yet)."""
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


# ----------------------------------------------------------------------------------------------------------------
# PySide6 features per module


def _feature_module():
    import __feature__  # PySide6's pseudo-module; present once PySide6 is imported

    return __feature__


@contextlib.contextmanager
def _modules_pyside_can_scan():
    """Hide, for the duration, modules that PySide6's feature scan cannot inspect: it unwraps each loaded module
    (``inspect.unwrap``, following ``__wrapped__``), and ``torch.classes`` answers that with a RuntimeError."""
    hidden = {}
    for name, module in list(sys.modules.items()):
        try:
            inspect.unwrap(module)
        except Exception:
            hidden[name] = sys.modules.pop(name)
    try:
        yield
    finally:
        sys.modules.update(hidden)


def set_features(module_name: str, *names: str) -> list[str]:
    """Switch the named PySide6 features (e.g. "true_property") on for code in ``module_name``, or all off when
    none is named; returns the features now selected for that module."""
    feature = _feature_module()
    flags = 0
    for name in names:
        if name not in feature.all_feature_names:
            raise ValueError(f"unknown PySide6 feature {name!r}")
        flags |= getattr(feature, name)
    with _modules_pyside_can_scan():
        feature.set_selection(flags, module_name)
    return feature.info(module_name)


def features(module_name: str) -> list[str]:
    """The PySide6 features selected for code in ``module_name``."""
    return _feature_module().info(module_name)


def import_with_true_property(module_name: str) -> types.ModuleType:
    """Import (or return) ``module_name`` with PySide6's ``true_property`` on for its code only."""
    selected = set_features(module_name, "true_property")
    if "true_property" not in selected:
        raise RuntimeError(f"PySide6 did not select true_property for {module_name}: {selected}")
    module = sys.modules.get(module_name) or importlib.import_module(module_name)
    # The import hook gives modules without "PySide6" in their source the default -1 ("ignored") only when
    # they have no entry yet; check that ours survived the import.
    if "true_property" not in features(module_name):
        raise RuntimeError(f"true_property was reset for {module_name} during its import")
    return module


# ----------------------------------------------------------------------------------------------------------------
# Stand-ins for Slicer's custom widgets


def _qt_property(type_, name, default, signal=None):
    """A Qt property stored in ``self._props``, notifying ``signal`` (a signal attribute name) on change."""

    def getter(self):
        return self._props.get(name, default)

    def setter(self, value):
        if self._props.get(name, default) == value:
            return
        self._props[name] = value
        if signal:
            getattr(self, signal).emit(value)

    return Property(type_, getter, setter)


class qMRMLWidget(QtWidgets.QWidget):
    """qMRMLWidget: a QWidget that holds a MRML scene and announces it through ``mrmlSceneChanged``."""

    mrmlSceneChanged = Signal(SCENE)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._props = {}
        self._scene = None

    @Slot(SCENE)
    def setMRMLScene(self, scene):
        # The real widget emits mrmlSceneChanged(scene) here; PySide6 cannot emit the C++ type vtkMRMLScene*.
        self._scene = scene

    def mrmlScene(self):
        return self._scene


class qSlicerWidget(qMRMLWidget):
    """qSlicerWidget (base class of Slicer's module widgets)."""


class qMRMLNodeComboBox(QtWidgets.QWidget):
    """qMRMLNodeComboBox: ``currentNode()`` / ``setCurrentNode(node)`` and ``currentNodeChanged`` as in Slicer.

    Like the real one, it only selects nodes of its ``nodeTypes`` (checked with ``IsA`` on MRML nodes)."""

    currentNodeChanged = Signal(object)
    currentNodeIDChanged = Signal(str)
    nodeAddedByUser = Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._props = {}
        self._scene = None
        self._node = None

    nodeTypes = _qt_property("QStringList", "nodeTypes", [])
    showHidden = _qt_property(bool, "showHidden", False)
    showChildNodeTypes = _qt_property(bool, "showChildNodeTypes", True)
    noneEnabled = _qt_property(bool, "noneEnabled", False)
    addEnabled = _qt_property(bool, "addEnabled", True)
    removeEnabled = _qt_property(bool, "removeEnabled", True)
    editEnabled = _qt_property(bool, "editEnabled", False)
    renameEnabled = _qt_property(bool, "renameEnabled", False)
    selectNodeUponCreation = _qt_property(bool, "selectNodeUponCreation", True)
    baseName = _qt_property(str, "baseName", "")
    noneDisplay = _qt_property(str, "noneDisplay", "None")

    @Slot(SCENE)
    def setMRMLScene(self, scene):
        self._scene = scene

    def mrmlScene(self):
        return self._scene

    def currentNode(self):
        return self._node

    def currentNodeID(self):
        return self._node.GetID() if self._node is not None and hasattr(self._node, "GetID") else ""

    def accepts(self, node) -> bool:
        """Whether the real combo box would list ``node`` (its class is one of ``nodeTypes``)."""
        types_ = list(self.nodeTypes)
        if node is None or not types_ or not hasattr(node, "IsA"):
            return True
        return any(node.IsA(name) for name in types_)

    def setCurrentNode(self, node):
        if node is not None and not self.accepts(node):
            return  # not in the combo box's list: the real widget keeps its selection
        if node is self._node:
            return
        self._node = node
        self.currentNodeChanged.emit(node)
        self.currentNodeIDChanged.emit(self.currentNodeID())


class qMRMLSegmentSelectorWidget(qMRMLWidget):
    """qMRMLSegmentSelectorWidget: a segmentation node plus a current segment ID."""

    currentNodeChanged = Signal(object)
    currentSegmentChanged = Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._node = None
        self._segment = ""

    noneEnabled = _qt_property(bool, "noneEnabled", False)
    editEnabled = _qt_property(bool, "editEnabled", False)
    multiSelection = _qt_property(bool, "multiSelection", False)
    segmentationNodeSelectorVisible = _qt_property(bool, "segmentationNodeSelectorVisible", True)

    def currentNode(self):
        return self._node

    def setCurrentNode(self, node):
        if node is not self._node:
            self._node = node
            self.currentNodeChanged.emit(node)

    def currentSegmentID(self):
        return self._segment

    def setCurrentSegmentID(self, segment_id):
        if segment_id != self._segment:
            self._segment = segment_id
            self.currentSegmentChanged.emit(segment_id)


class qSlicerMarkupsPlaceWidget(qSlicerWidget):
    """qSlicerMarkupsPlaceWidget: the current markups node and the ``placeModeEnabled`` property."""

    activeMarkupsPlaceModeChanged = Signal(bool)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._node = None

    placeModeEnabled = _qt_property(bool, "placeModeEnabled", False, signal="activeMarkupsPlaceModeChanged")
    placeModePersistency = _qt_property(bool, "placeModePersistency", False)
    buttonsVisible = _qt_property(bool, "buttonsVisible", True)
    deleteAllControlPointsOptionVisible = _qt_property(bool, "deleteAllControlPointsOptionVisible", True)
    unsetLastControlPointOptionVisible = _qt_property(bool, "unsetLastControlPointOptionVisible", False)
    unsetAllControlPointsOptionVisible = _qt_property(bool, "unsetAllControlPointsOptionVisible", False)

    def currentNode(self):
        return self._node

    def currentMarkupsNode(self):
        return self._node

    def setCurrentNode(self, node):
        self._node = node

    def setPlaceModeEnabled(self, enabled):
        self.placeModeEnabled = bool(enabled)


class ctkCollapsibleButton(QtWidgets.QWidget):
    """ctkCollapsibleButton: a titled section (``text``) that can be ``collapsed``."""

    contentsCollapsed = Signal(bool)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._props = {}

    text = _qt_property(str, "text", "")
    collapsed = _qt_property(bool, "collapsed", False, signal="contentsCollapsed")


class ctkPathLineEdit(QtWidgets.QWidget):
    """ctkPathLineEdit: a path in ``currentPath``."""

    currentPathChanged = Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._props = {}

    currentPath = _qt_property(str, "currentPath", "", signal="currentPathChanged")
    nameFilters = _qt_property("QStringList", "nameFilters", [])


class ctkSliderWidget(QtWidgets.QWidget):
    """ctkSliderWidget: a float ``value`` within ``minimum``..``maximum``."""

    valueChanged = Signal(float)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._props = {}

    value = _qt_property(float, "value", 0.0, signal="valueChanged")
    minimum = _qt_property(float, "minimum", 0.0)
    maximum = _qt_property(float, "maximum", 99.0)
    singleStep = _qt_property(float, "singleStep", 1.0)
    decimals = _qt_property(int, "decimals", 2)


STANDINS = (
    qMRMLWidget,
    qSlicerWidget,
    qMRMLNodeComboBox,
    qMRMLSegmentSelectorWidget,
    qSlicerMarkupsPlaceWidget,
    ctkCollapsibleButton,
    ctkPathLineEdit,
    ctkSliderWidget,
)


def load_ui(path, warnings: list | None = None) -> QtWidgets.QWidget:
    """Load a Slicer ``.ui`` file with the stand-ins registered. Qt's warnings during the load (failed
    connections, unknown properties...) are appended to ``warnings`` when given."""
    application()
    loader = QUiLoader()
    for cls in STANDINS:
        loader.registerCustomWidget(cls)
    collected = []

    def handler(mode, context, message):
        collected.append(message)

    previous = QtCore.qInstallMessageHandler(handler)
    try:
        file = QtCore.QFile(str(path))
        if not file.open(QtCore.QIODevice.ReadOnly):
            raise OSError(f"cannot open {path}")
        try:
            widget = loader.load(file)
        finally:
            file.close()
    finally:
        QtCore.qInstallMessageHandler(previous)
    if widget is None:
        raise RuntimeError(f"QUiLoader could not load {path}: {loader.errorString()}")
    if warnings is not None:
        warnings.extend(collected)
    return widget


def child_widget_variables(widget) -> types.SimpleNamespace:
    """Like ``slicer.util.childWidgetVariables``: every named child widget as an attribute."""
    ui = types.SimpleNamespace()
    for child in widget.findChildren(QtWidgets.QWidget):
        name = child.objectName()
        if name:
            setattr(ui, name, child)
    return ui


# This module's own code (the stand-ins) runs with plain PySide6, whatever the module under test selects.
set_features(__name__)
