"""The item table: each reference's domain (a catalogue photo or a customer photo), read back from old tables too, and
which photo shows a product."""

from __future__ import annotations

import json

import numpy as np
import pytest

from street2shop.errors import DataError
from street2shop.items import Item, catalogue_photos, domain_counts, item_lines, read_items


def test_the_domain_round_trips_and_an_old_line_without_it_is_a_catalogue_photo(tmp_path):
    items = [Item("p1", "shop/p1.jpg", "bags", {"product_name": "Tote"}), Item("p1", "reviews/4411.jpg", "bags", domain="street")]
    table = tmp_path / "items.jsonl"
    table.write_text("".join(item_lines(items, numbered=True)))
    assert [json.loads(line)["domain"] for line in table.read_text().splitlines()] == ["shop", "street"]
    assert read_items(table, 2, numbered=True) == items
    # A table written before the domain existed: every line is a catalogue photo.
    old = tmp_path / "old.jsonl"
    old.write_text('{"row": 0, "product_id": "p1", "image_path": "shop/p1.jpg", "category": null}\n')
    assert read_items(old, 1, numbered=True) == [Item("p1", "shop/p1.jpg", None, {}, "shop")]


def test_an_unknown_domain_is_refused_naming_the_line(tmp_path):
    table = tmp_path / "items.jsonl"
    table.write_text('{"product_id": "p1"}\n{"product_id": "p2", "domain": "studio"}\n')
    with pytest.raises(DataError, match=r"domain must be one of .*'studio'.*line 2 of"):
        read_items(table)
    with pytest.raises(ValueError, match="domain"):
        Item("p1", domain="Shop")


def test_a_products_catalogue_photo_is_its_first_live_shop_photo():
    items = [
        Item("a", "a-review.jpg", domain="street"),  # row 0: a customer photo comes first; not the one shown
        Item("a", "a-front.jpg"),                    # row 1: a's first catalogue photo
        Item("a", "a-back.jpg"),
        Item("b", "b-front.jpg"),                    # row 3: removed below
        Item("b", "b-side.jpg"),
        Item("c", "c-review.jpg", domain="street"),  # c: customer photos only
    ]
    assert {p: i.image_path for p, i in catalogue_photos(items).items()} == {"a": "a-front.jpg", "b": "b-front.jpg"}
    dead = np.array([False, False, False, True, False, False])
    assert {p: i.image_path for p, i in catalogue_photos(items, dead).items()} == {"a": "a-front.jpg", "b": "b-side.jpg"}
    assert domain_counts(items) == {"shop": 4, "street": 2}
    assert domain_counts([i.to_dict() for i in items] + [{"product_id": "old"}]) == {"shop": 5, "street": 2}
