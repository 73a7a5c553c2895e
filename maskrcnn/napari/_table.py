"""The dock's instance table: one row per instance of the last segmentation, sortable."""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QHeaderView, QTableWidget, QTableWidgetItem

from ..outputs.files import TABLE_FIELDS
from ._core import table_fields

MAX_TABLE_ROWS = 5000  # rows shown in the dock; the layer's features and a saved CSV hold all of them


class InstanceTable(QTableWidget):
    """Read-only table of the rows of NAME_instances.csv (``outputs.TABLE_FIELDS``), or of a stack's
    3-D instances, sorted by id."""

    def __init__(self) -> None:
        super().__init__(0, len(TABLE_FIELDS))
        self.fields = list(TABLE_FIELDS)
        self.setHorizontalHeaderLabels(self.fields)
        self.verticalHeader().setVisible(False)
        self.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.setSortingEnabled(True)

    def fill(self, rows: list[dict]) -> None:
        self.setSortingEnabled(False)
        self.fields = table_fields(rows)
        self.setColumnCount(len(self.fields))
        self.setHorizontalHeaderLabels(self.fields)
        shown = rows[:MAX_TABLE_ROWS]
        self.setRowCount(len(shown))
        for r, row in enumerate(shown):
            for c, key in enumerate(self.fields):
                item = QTableWidgetItem()
                value = row[key]
                item.setData(Qt.ItemDataRole.DisplayRole, value if isinstance(value, (int, float)) else str(value))
                self.setItem(r, c, item)
        self.setSortingEnabled(True)
        self.sortItems(self.fields.index("id"), Qt.SortOrder.AscendingOrder)

    def label_at(self, row: int) -> int | None:
        """The instance id shown in ``row`` (after any sorting), None for an empty row."""
        item = self.item(row, self.fields.index("id"))
        return None if item is None else int(item.data(Qt.ItemDataRole.DisplayRole))
