//! The process-wide label table once full, in a process of its own (the table keeps its first
//! values for the life of the process): values past it are still labels equal by text, and free
//! text in the input cannot grow it without end.

use dongflow_records::label::TABLE_LIMIT;
use dongflow_records::Label;

#[test]
fn past_the_kept_values_labels_are_counted_and_freed_with_their_last_holder() {
    let kept: Vec<Label> = (0..TABLE_LIMIT)
        .map(|i| Label::new(&format!("kept-{i}")))
        .collect();
    assert!(kept.iter().all(Label::is_kept));
    assert_eq!(Label::counted_values(), 0);

    let past = Label::new("past-the-limit");
    let again = Label::new("past-the-limit");
    assert!(!past.is_kept());
    assert_eq!(past, again, "one number per text");
    assert_eq!(Label::counted_values(), 1);
    assert_eq!(past.to_string(), "past-the-limit");
    assert!(
        past > kept[0],
        "ordered by text: {past:?} after {:?}",
        kept[0]
    );
    assert!(Label::new("a-free-text") < kept[0]);
    let json = serde_json::to_string(&past).expect("json");
    assert_eq!(json, "\"past-the-limit\"");
    let back: Label = serde_json::from_str(&json).expect("back");
    assert_eq!(back, past);

    // A held kept value stays kept, found without the table's growth.
    assert!(Label::new("kept-7").is_kept());
    assert_eq!(Label::new("kept-7"), kept[7]);

    // Free text: a hundred thousand distinct values, each dropped, leave nothing behind.
    for i in 0..100_000 {
        let label = Label::new(&format!("free-{i}"));
        let copy = label.clone();
        assert_eq!(copy, label);
    }
    assert_eq!(Label::counted_values(), 1, "only past-the-limit is held");
    drop((past, again, back));
    assert_eq!(Label::counted_values(), 0, "freed with the last holder");
}
